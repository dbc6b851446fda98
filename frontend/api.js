// Client for the convviz HTTP API (tb_convviz/plugin/http_api.md). URLs are built relative to
// this module, which TensorBoard serves at data/plugin/convviz/static/, so --path_prefix and
// reverse proxies keep working.

const BASE = new URL("../", import.meta.url);
const CACHE_LIMIT = 64;

/** An answer from the backend that the UI shows as a message. */
export class ApiError extends Error {}

/**
 * Absolute URL of a route with its query parameters; `null`/`undefined` values are left out.
 * `params.source` asks a record route for that source's records instead of the view's.
 */
export function routeUrl(route, { source: wanted, ...params } = {}) {
  const url = new URL(route, BASE);
  const from = wanted ?? source;
  // The probe set is the server's default: its URLs stay the same whoever asks for them.
  if (from !== "probe" && SOURCE_ROUTES.has(route)) url.searchParams.set("source", from);
  for (const [key, value] of Object.entries(params)) {
    if (value != null) url.searchParams.set(key, String(value));
  }
  if (cropField && IMAGE_ROUTES.has(route)) url.searchParams.set("field", cropField);
  return url.href;
}

// Routes that serve records, their images and projections: they take the view's `source`.
const SOURCE_ROUTES = new Set(["topk", "compare", "patch", "mosaic", "evolution", "probe_image", "stats",
  "projection", "projection_mosaic", "row", "fig4"]);
let source = "probe";

/** Ask record routes for `next`'s records ("probe", "train" or "eval") from now on. */
export function setSource(next) {
  source = next;
}

/** The source record routes are asked for now. */
export const currentSource = () => source;

// The `field` every image route is asked for (null: the server's default, the effective field).
const IMAGE_ROUTES = new Set(["patch", "mosaic", "probe_image", "projection", "projection_mosaic", "row"]);
let cropField = null;

/** Ask every image route for `field` (null for the default); returns whether that changed. */
export function setCropField(field) {
  const changed = field !== cropField;
  cropField = field;
  return changed;
}

const cache = new Map();

/** GET a JSON route; backend errors become an `ApiError` carrying the backend's reason. */
export async function getJson(route, params = {}, { cached = false } = {}) {
  const url = routeUrl(route, params);
  if (cached && cache.has(url)) return cache.get(url);
  const pending = fetchJson(url, route);
  if (cached) {
    cache.set(url, pending);
    pending.catch(() => cache.delete(url));
    if (cache.size > CACHE_LIMIT) cache.delete(cache.keys().next().value);
  }
  return pending;
}

async function fetchJson(url, route) {
  let response;
  try {
    response = await fetch(url, { headers: { Accept: "application/json" } });
  } catch (e) {
    throw new ApiError(`Cannot reach TensorBoard (${e.message}). Is it still running?`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // A non-JSON body (a proxy's error page, say) is reported below with the status.
  }
  if (!response.ok) {
    throw new ApiError(body?.error ?? `The ${route} request failed with HTTP ${response.status}.`);
  }
  if (body === null) throw new ApiError(`The ${route} response is not JSON.`);
  return body;
}

/** Every unit of a paged route (`topk`, `compare`), paging through layers larger than one response. */
export async function allUnits(route, params) {
  const first = await getJson(route, params, { cached: true });
  if (first.units.length >= first.total_units) return first;
  const units = [...first.units];
  while (units.length < first.total_units) {
    const page = await getJson(route, { ...params, offset: units.length }, { cached: true });
    if (!page.units.length) break;
    units.push(...page.units);
  }
  return { ...first, units };
}

/** Every unit of a layer at a step. */
export const topk = (run, layer, step) => allUnits("topk", { run, layer, step });

// What one request may ask for, as the backend publishes it in `runs` (see setLimits).
let limits = { min_size: 8, max_size: 512 };

/** Keep the backend's published request limits (the `limits` of a `runs` answer). */
export function setLimits(published) {
  if (published && Number.isInteger(published.max_size)) limits = published;
}

/** A `size` parameter within the published limits; `undefined` (the server's own budget) stays so. */
export function clampSize(size) {
  if (size == null || !Number.isFinite(size)) return undefined;
  return Math.min(limits.max_size, Math.max(limits.min_size, Math.round(size)));
}

/** The `size` to ask for to draw `css` CSS pixels sharply on this screen (2x on most laptops' screens). */
export const screenSize = (css) => clampSize(css == null ? css : css * Math.min(window.devicePixelRatio || 1, 2));

/**
 * `size`: the CSS pixels a patch's longer side is drawn at. The API resamples each patch to
 * that size (times the screen's pixel ratio), so every layer is drawn alike and sharp.
 */
// `source`, here and below: whose records ("probe", "train", "eval"); by default the view's.
export const mosaicUrl = (run, layer, step, unit, size, source = undefined) =>
  routeUrl("mosaic", { run, layer, step, unit, size: screenSize(size), source });
// `overlay`: "projection" spotlights the image by the record's projection (where the unit fires).
export const patchUrl = (run, layer, step, unit, rank, size, overlay = null, source = undefined) =>
  routeUrl("patch", { run, layer, step, unit, rank, size: screenSize(size), overlay, source });
export const probeImageUrl = (run, layer, step, unit, rank, index, overlay = null, source = undefined) =>
  routeUrl("probe_image", { run, index, layer, step, unit, rank, overlay, source });
