// Patch, projection, or both (Zeiler & Fergus Fig. 2): the toggle, and the image URLs each choice shows.

import { h } from "./dom.js";
import { routeUrl, screenSize } from "./api.js";

export const SHOWS = [["patch", "Patches"], ["projection", "Projections"], ["both", "Both"]];
export const NOT_LOGGED = "not logged in this run";

// `size`: CSS pixels per projection, as for `mosaicUrl`, so projections are drawn as large as the patches beside them.
export const projectionMosaicUrl = (run, layer, step, unit, size, source = undefined) =>
  routeUrl("projection_mosaic", { run, layer, step, unit, size: screenSize(size), source });
export const projectionUrl = (run, layer, step, unit, rank, size) =>
  routeUrl("projection", { run, layer, step, unit, rank, size: screenSize(size) });
export const rowUrl = (run, layer, unit, steps, kind, size) =>
  routeUrl("row", { run, layer, unit, steps: steps.join(","), kind, size });

/** Whether `layer` has a projection at `step` (for `rank` > 0: all k projected there). */
export function hasProjection(layer, step, rank = 0) {
  const p = layer?.projections;
  return !!p && p.steps.includes(step) && (rank === 0 || p.topk_steps.includes(step));
}

/** What `show` resolves to for a layer: without logged projections, patches only. */
export function effectiveShow(show, layer) {
  return layer?.projections ? (show ?? "patch") : "patch";
}

/** The Patches / Projections / Both toggle; says "not logged in this run" when there is nothing to toggle. */
export function showToggle(layer, show, onChange) {
  const logged = !!layer?.projections;
  const p = layer?.projections;
  const rule = p ? `${p.rule}${p.uncovered.length ? `; ${p.uncovered.join(", ")} pass the plain gradient` : ""}` : "";
  return h("div", { class: "cv-show-toggle", role: "group", "aria-label": "Show patches or projections" },
    SHOWS.map(([value, label]) => h("button", {
      type: "button", class: "cv-button cv-show", "aria-pressed": String(logged ? (show ?? "patch") === value : value === "patch"),
      disabled: !logged && value !== "patch",
      dataset: { show: value },
      title: logged ? (value === "patch" ? "The receptive-field crop of the probe image"
        : `The ${rule} projection of the activation back to pixel space`) : `Projections: ${NOT_LOGGED}`,
      onclick: () => onChange(value),
    }, label)),
    logged ? h("span", { class: "cv-dim cv-show-rule", title: rule }, p.rule)
      : h("span", { class: "cv-dim cv-show-missing" }, `Projections: ${NOT_LOGGED}`));
}

/**
 * Point `figure` (a MosaicFigure of `patch`-pixel cells) at a unit's projections at `step`: all k
 * in the patches' layout where all were projected, else the top-1 alone, as large as the whole mosaic.
 */
export function assignProjection(feed, figure, { run, layer, step, unit, records, patch, highlight = [], source }) {
  const all = hasProjection(layer, step, 1);
  const { width, height } = figure.geometry;
  figure.img.style.width = all ? "" : `${width}px`;
  figure.img.style.height = all ? "" : `${height}px`;
  figure.setRecords(all ? records : records.filter((r) => r.rank === 0),
    { highlight: all ? highlight : highlight.filter((rank) => rank === 0), step, unit });
  feed.assign(figure.img, projectionMosaicUrl(run, layer.name, step, unit, all ? patch : Math.max(width, height), source));
}
