// Zoom: a unit's patches (or one patch, or the layer-1 filters) large, at a size the user picks;
// the API resamples each patch to that size, nearest-neighbour when enlarging, so pixels stay crisp.

import { h, fill, select, formatValue } from "./dom.js";
import { currentSource, patchUrl } from "./api.js";
import { imageNoun } from "./source.js";
import { firesToggle, openDialog, labelText, layerTitle, mosaicGeometry, recordAlt, recordTip, showProbeImage } from "./widgets.js";
import { hasProjection } from "./show.js";

export const ZOOM_SIZES = [64, 96, 128, 192, 256, 384];
const DEFAULT_SIZE = 128;
const STORAGE_KEY = "convviz.zoom";

function savedSize() {
  try {
    const size = Number(localStorage.getItem(STORAGE_KEY));
    return ZOOM_SIZES.includes(size) ? size : DEFAULT_SIZE;
  } catch {
    return DEFAULT_SIZE;
  }
}

function saveSize(size) {
  try {
    localStorage.setItem(STORAGE_KEY, String(size));
  } catch {
    // storage can be disabled; the size then lasts for this dialog
  }
}

/**
 * A zoom dialog: `draw(size)` fills `body` at a patch size the user picks (remembered across
 * dialogs). Keys in the dialog: + and - change the size, Escape closes it.
 */
export function zoomDialog({ title, body, draw, tools = [] }, ...after) {
  let size = savedSize();
  const sizes = select(ZOOM_SIZES.map((s) => [s, `${s} px`]), size, (value) => setSize(Number(value)),
    { "aria-label": "Patch size", class: "cv-zoom-size" });
  const setSize = (value) => {
    size = value;
    sizes.value = String(value);
    saveSize(value);
    draw(size);
  };
  draw(size);
  const dialog = openDialog({
    title, className: "cv-zoom", tools: [...tools, h("label", { class: "cv-field" }, "Patch size", sizes)],
  }, h("div", { class: "cv-zoom-body" }, body), ...after);
  dialog.addEventListener("keydown", (e) => {
    const i = ZOOM_SIZES.indexOf(size) + ({ "+": 1, "=": 1, "-": -1 }[e.key] ?? 0);
    if (i >= 0 && i < ZOOM_SIZES.length && ZOOM_SIZES[i] !== size) {
      setSize(ZOOM_SIZES[i]);
      e.preventDefault();
    }
  });
  return dialog;
}

/**
 * Open `records` of `unit` at `step` large. `highlight` ranks are outlined (images shared
 * with the other side of a comparison); `side` names that side ("A", "B") in the title.
 * `source`: whose records they are, when not the view's (see api.js).
 */
export function showZoom({ run, layer, step, unit, records, highlight = [], side = null, source = undefined }) {
  let fires = false;
  let shown = null;  // the size drawn last, for the "Where it fires" toggle to redraw at
  const marked = new Set(highlight);
  const cols = records.length === 1 ? 1 : Math.ceil(Math.sqrt(layer.k));
  const grid = h("div", { class: "cv-zoom-grid", style: { "grid-template-columns": `repeat(${cols}, auto)` } });
  const draw = (size) => {
    shown = size;
    const { pw, ph } = mosaicGeometry(layer, size);
    const whose = source ?? currentSource();
    fill(grid, records.map((r) => h("figure", { class: marked.has(r.rank) ? "cv-zoom-patch cv-shared" : "cv-zoom-patch" },
      h("button", {
        type: "button", class: "cv-zoom-open", title: `${recordTip(r, step, unit, whose)}\nClick: the whole ${imageNoun(whose)}`,
        onclick: () => showProbeImage({ run, layer, step, unit, record: r, source }),
      }, h("img", {
        class: "cv-pixelated", alt: recordAlt(unit, step, r, whose),
        src: patchUrl(run, layer.name, step, unit, r.rank, size, fires && hasProjection(layer, step, r.rank) ? "projection" : null, source),
        width: pw, height: ph,
      })),
      h("figcaption", {},
        h("span", { class: "cv-zoom-rank" }, `${r.rank + 1}`),
        h("span", {}, `#${r.image}`),
        labelText(r) != null ? h("span", { class: "cv-zoom-label", title: labelText(r) }, labelText(r)) : null,
        h("span", { class: "cv-zoom-value" }, formatValue(r.value))))));
  };
  const what = records.length === 1 ? `rank ${records[0].rank + 1}` : `top-${layer.k}`;
  const title = `${side ? `${side} · ` : ""}Unit ${unit} · ${layerTitle(layer)} · step ${step} · ${what}`;
  const tools = layer.projections?.steps.includes(step) ? [firesToggle((on) => { fires = on; draw(shown); })] : [];
  return zoomDialog({ title, body: grid, draw, tools },
    marked.size ? h("p", { class: "cv-caption" }, "Outlined: probe images in both top-k sets of the comparison.") : null);
}
