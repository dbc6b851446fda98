// View state lives in the iframe's URL hash, so it survives a reload and can be shared as a
// link; the last state is also remembered for when TensorBoard recreates the iframe bare.

const KEYS = ["view", "run", "layer", "step", "unit", "sort", "order", "other_run", "other_step", "expand"];
const NUMBERS = new Set(["step", "unit", "other_step"]);
const STORAGE_KEY = "convviz.state";

function parse(text) {
  const params = new URLSearchParams(text);
  const state = {};
  for (const key of KEYS) {
    const raw = params.get(key);
    if (raw == null || raw === "") continue;
    if (NUMBERS.has(key)) {
      const n = Number(raw);
      if (Number.isInteger(n)) state[key] = n;
    } else {
      state[key] = raw;
    }
  }
  return state;
}

function serialize(state) {
  const params = new URLSearchParams();
  for (const key of KEYS) {
    if (state[key] != null && state[key] !== "") params.set(key, String(state[key]));
  }
  return params.toString();
}

/** The state named by the hash, else the one last used in this browser. */
export function readState() {
  if (location.hash.length > 1) return parse(location.hash.slice(1));
  try {
    return parse(localStorage.getItem(STORAGE_KEY) ?? "");
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
}

/** Remember `state` for a bare reload; call it only once the state has rendered. */
export function rememberState(state) {
  try {
    localStorage.setItem(STORAGE_KEY, serialize(state));
  } catch {
    // see readState
  }
}

/** Forget the remembered state (it failed to render) and drop it from the hash. */
export function forgetState() {
  try {
    localStorage.removeItem(STORAGE_KEY);
  } catch {
    // see readState
  }
  writeState({});
}
