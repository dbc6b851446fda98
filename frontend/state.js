// View state lives in the iframe's URL hash, so it survives a reload, and is mirrored into
// TensorBoard's own address (`#convviz&cv.run=...`), so a copied address opens the same view.
// The last state is also remembered for when TensorBoard recreates the iframe bare.

const KEYS = ["view", "run", "layer", "step", "unit", "sort", "order", "b_run", "b_step", "expand",
  "match", "against", "filter", "patch", "show", "rows", "count", "seed", "units", "cols", "filters", "filter_step",
  "source", "field", "beside"];
const NUMBERS = new Set(["step", "unit", "b_step", "other_step", "patch", "count", "seed", "filter_step"]);
const STORAGE_KEY = "convviz.state";
// TensorBoard's hash is `#<plugin>&key=value&...` (its tf_storage keeps unknown keys); ours are prefixed.
const PARENT_PREFIX = "cv.";
const PLUGIN = "convviz";

function parse(params, prefix = "") {
  const state = {};
  for (const key of [...KEYS, ...OLD_COMPARE_KEYS]) {
    const raw = params.get(prefix + key);
    if (raw == null || raw === "") continue;
    if (NUMBERS.has(key)) {
      const n = Number(raw);
      if (Number.isInteger(n)) state[key] = n;
    } else {
      state[key] = raw;
    }
  }
  return fromOldCompareLink(state);
}

// Compare links used to name side A `other_run`/`other_step` and side B `run`/`step`. Now
// `run`/`step` are A, as a person writing a link expects, and B has keys of its own
// (`b_run`, `b_step`): a link with `other_*` and no `b_*` is an old one, read the old way.
const OLD_COMPARE_KEYS = ["other_run", "other_step"];

function fromOldCompareLink(state) {
  const { other_run: oldRun, other_step: oldStep, ...rest } = state;
  if ((oldRun == null && oldStep == null) || rest.b_run != null || rest.b_step != null) return rest;
  // The old B was `run` at `step`; the old A, `other_run` (default: the same run) at `other_step`.
  if (rest.run != null) rest.b_run = rest.run;
  if (oldRun != null) rest.run = oldRun;
  if (oldStep == null) return rest;  // A's step was B's default: the new B's default stands in
  if (rest.step != null) rest.b_step = rest.step;
  rest.step = oldStep;
  return rest;
}

function serialize(state, prefix = "") {
  const params = new URLSearchParams();
  for (const key of KEYS) {
    if (state[key] != null && state[key] !== "") params.set(prefix + key, String(state[key]));
  }
  return params.toString();
}

/** TensorBoard's window when the tab runs in its iframe (same origin), else null. */
function tensorBoardWindow() {
  try {
    return window.parent !== window && window.parent.location.origin === location.origin ? window.parent : null;
  } catch {
    return null;  // a cross-origin embedder: the iframe's own hash still works
  }
}

/** TensorBoard's hash split into its plugin and its other `&` components. */
function parentHash(win) {
  const parts = win.location.hash.slice(1).split("&").filter(Boolean);
  const plugin = parts.length && !parts[0].includes("=") ? parts.shift() : "";
  return { plugin, rest: parts.filter((p) => !p.startsWith(PARENT_PREFIX)) };
}

/** TensorBoard's address showing our tab in `state`, keeping its other hash components. */
function parentUrl(win, state) {
  const url = new URL(win.location.href);
  url.hash = [PLUGIN, ...parentHash(win).rest, serialize(state, PARENT_PREFIX)].filter(Boolean).join("&");
  return url.href;
}

/** The state named by the iframe's hash, else by TensorBoard's address, else the one last used here. */
export function readState() {
  if (location.hash.length > 1) return parse(new URLSearchParams(location.hash.slice(1)));
  const parent = tensorBoardWindow();
  if (parent) {
    const found = parse(new URLSearchParams(parent.location.hash.slice(1)), PARENT_PREFIX);
    if (Object.keys(found).length) return found;
  }
  try {
    return parse(new URLSearchParams(localStorage.getItem(STORAGE_KEY) ?? ""));
  } catch {
    return {};  // storage can be disabled; the hash alone still works
  }
}

/** Show `state` in the URL hash (for reload and sharing); it is remembered only by `rememberState`. */
export function writeState(state) {
  // An absolute URL: plugin_entry.html has a <base href>, against which a bare "#..." would resolve.
  const url = new URL(location.href);
  url.hash = serialize(state);
  if (url.href !== location.href) history.replaceState(null, "", url.href);
  const parent = tensorBoardWindow();
  // Only while our tab is the one shown: TensorBoard owns its hash otherwise.
  if (parent && [PLUGIN, ""].includes(parentHash(parent).plugin)) {
    const target = parentUrl(parent, state);
    // replaceState fires no hashchange, so TensorBoard's router is not disturbed.
    if (target !== parent.location.href) parent.history.replaceState(parent.history.state, "", target);
  }
}

/** Remember `state` for a bare reload; call it only once the state has rendered. */
export function rememberState(state) {
  try {
    localStorage.setItem(STORAGE_KEY, serialize(state));
  } catch {
    // see readState
  }
}

/** An address that opens this exact view in a fresh browser: TensorBoard's own, when the tab is inside it. */
export function shareUrl(state) {
  const parent = tensorBoardWindow();
  if (parent) return parentUrl(parent, state);
  const url = new URL(location.href);
  url.hash = serialize(state);
  return url.href;
}

/** Forget the remembered state (it failed to render) and drop it from the hash, TensorBoard's too. */
export function forgetState() {
  try {
    localStorage.removeItem(STORAGE_KEY);
  } catch {
    // see readState
  }
  writeState({});
}
