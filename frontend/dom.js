// DOM construction without HTML parsing: every string becomes a text node or an attribute value,
// so run, layer and class names can never inject markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(el, props, children) {
  for (const [key, value] of Object.entries(props)) {
    if (value == null || value === false) continue;
    if (key === "class") el.setAttribute("class", value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "style") for (const [name, v] of Object.entries(value)) el.style.setProperty(name, v);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  el.append(...present(children));
  return el;
}

const present = (children) => children.flat(Infinity).filter((c) => c != null && c !== false);

/** Replace the children of `el`, skipping `null`/`false` (which `replaceChildren` would print). */
export function fill(el, ...children) {
  el.replaceChildren(...present(children));
  return el;
}

/** Create an HTML element with attributes, `on*` listeners and text or element children. */
export function h(tag, props = {}, ...children) {
  return build(document.createElement(tag), props, children);
}

/** Create an SVG element, as `h` does for HTML. */
export function svg(tag, props = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), props, children);
}

/** A `<select>` whose options are `[value, label]` pairs, calling `onChange(value)`. */
export function select(options, value, onChange, props = {}) {
  const el = h(
    "select",
    { ...props, onchange: () => onChange(el.value) },
    options.map(([v, label]) => h("option", { value: String(v) }, label)),
  );
  el.value = String(value);
  return el;
}

/** A callout for errors, empty states and notes; `lines` may hold strings or nodes. */
export function message(kind, title, ...lines) {
  return h(
    "div",
    { class: `cv-message cv-message-${kind}`, role: kind === "error" ? "alert" : "status" },
    h("strong", {}, title),
    lines.map((line) => h("p", {}, line)),
  );
}

export function formatValue(v) {
  if (v == null || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e4 || a < 1e-3)) return v.toExponential(2);
  return v.toFixed(a >= 100 ? 1 : a >= 10 ? 2 : 3);
}

export function formatPercent(v) {
  return v == null ? "–" : `${Math.round(v * 100)}%`;
}
