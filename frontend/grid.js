// Layer grid (Zeiler & Fergus Fig. 2): one tile per unit with its top-k mosaic at a checkpoint.

import { h, fill, select, message, formatValue, formatPercent } from "./dom.js";
import { currentSource, topk, mosaicUrl } from "./api.js";
import { imageNoun, sourceName } from "./source.js";
import { layerTabs, StepSlider, startMosaicGrid, MosaicFigure, recordsAlt, PATCH_SIZES, DEFAULT_PATCH } from "./widgets.js";
import { unitJump, filterOptions, filterSelect, passes } from "./finder.js";
import { showZoom } from "./zoom.js";
import { assignProjection, effectiveShow, hasProjection, projectionMosaicUrl, showToggle } from "./show.js";
import { FiltersPanel, filtersToggle } from "./filters.js";
export const SORTS = [["unit", "Unit index"], ["peak", "Peak activation"], ["change", "Change since previous"]];

/** Order of units for a sort key; "change" puts the units that changed most first. */
export function sortUnits(units, sort) {
  const byUnit = (a, b) => a.unit - b.unit;
  const compare = {
    unit: byUnit,
    peak: (a, b) => b.peak - a.peak || byUnit(a, b),
    change: (a, b) => (a.overlap ?? 1) - (b.overlap ?? 1) || byUnit(a, b),
  }[sort] ?? byUnit;
  return [...units].sort(compare);
}

/** "n new" chip: how many of the unit's top-k images were not in its top-k at the previous checkpoint. */
function changeChip(overlap, k, previousStep) {
  if (overlap == null) return null;
  const fresh = Math.round((1 - overlap) * k);
  return h("span", {
    class: fresh ? "cv-chip cv-chip-changed" : "cv-chip",
    style: { "--change": String(1 - overlap) },
    title: `${k - fresh} of its top-${k} images were also in its top-${k} at step ${previousStep}`,
  }, fresh ? `${fresh} new` : "same");
}

/** A unit whose activations were NaN or infinite at this checkpoint has no ranks to show. */
export function notFiniteChip() {
  return h("span", { class: "cv-chip cv-chip-dead", title: "NaN or infinite activations at this checkpoint: no ranks" }, "not finite");
}

/** An image of `url`, loaded at low priority and decoded, not shown: a tile given that URL then draws at once. */
function decodedAhead(url) {
  const img = new Image();
  img.fetchPriority = "low";
  img.src = url;
  img.decode().catch(() => {});  // a failure shows on the tile, if it is opened
  return img;
}

export class GridView {
  constructor(app) {
    this.app = app;
    this.seq = 0;
    this.layerKey = null;
    this.tiles = new Map();
    this.feed = null;
    // Mosaics of the neighbouring checkpoints, fetched and decoded ahead (URL -> image).
    this.ahead = new Map();
    this.slider = new StepSlider({ onChange: (step) => app.navigate({ step }) });
    this.tabs = h("div", { class: "cv-tabs-slot" });
    this.sort = select(SORTS, "unit", (sort) => app.navigate({ sort }), { "aria-label": "Sort units by" });
    this.patchSize = select(PATCH_SIZES.map((s) => [s, `${s} px`]), DEFAULT_PATCH,
      (value) => app.navigate({ patch: Number(value) === DEFAULT_PATCH ? null : Number(value) }), { "aria-label": "Patch size" });
    // The unit field is built with the layer's tiles, not with each checkpoint's data, which
    // must not replace the input a user is typing into (nor take its focus).
    this.jumpSlot = h("span", { class: "cv-finder-jump" });
    this.filterSlot = h("span", { class: "cv-finder-filter" });
    this.finder = h("span", { class: "cv-finder" }, this.jumpSlot, this.filterSlot);
    this.summary = h("p", { class: "cv-summary" });
    this.notice = h("div", { class: "cv-notice" });
    this.showSlot = h("span", { class: "cv-show-slot" });
    this.filtersSlot = h("div", { class: "cv-filters-slot" });
    this.filters = null;
    this.grid = h("div", { class: "cv-grid", "aria-busy": "true", "aria-label": "Units" });
    this.data = null;
    this.el = h("section", { class: "cv-view cv-grid-view" },
      this.tabs,
      h("div", { class: "cv-toolbar" }, this.slider.el,
        h("label", { class: "cv-field" }, "Sort by", this.sort),
        h("label", { class: "cv-field", title: "Patch size in the tiles and the layer-1 filters; z or the magnifier opens a unit larger" }, "Patches", this.patchSize),
        this.showSlot),
      h("div", { class: "cv-toolbar cv-finder-bar" }, this.finder),
      this.filtersSlot, this.summary, this.notice, this.grid);
  }

  destroy() {
    this.slider.stop();
    this.feed?.disconnect();
    this.filters?.destroy();
  }

  /** The Layer 1 tab's filter toggle and, when on, the filters panel (its own slider over training). */
  updateFilters(run, layer, state) {
    const on = state.filters === "1";
    const toggle = layer.index === 1 ? filtersToggle(run, on, (value) => this.app.navigate({ filters: value ? "1" : null })) : null;
    if (!(on && run.filters)) {
      this.filters?.destroy();
      this.filters = null;
      fill(this.filtersSlot, toggle);
      return null;
    }
    this.filters ??= new FiltersPanel(this.app);
    fill(this.filtersSlot, toggle, this.filters.el);
    return this.filters.update(run, state);
  }

  onKey(event) {
    if (event.key === "ArrowLeft") this.slider.move(-1);
    else if (event.key === "ArrowRight") this.slider.move(1);
    else if (event.key === "g") this.finder.querySelector(".cv-unit-jump")?.focus();
    else if (event.key === "z" && this.filters?.el.matches(":hover")) this.filters.zoom();
    else if (event.key === "z") {
      // The tile under the pointer, else the focused one.
      const tile = this.grid.querySelector(".cv-tile:hover") ?? document.activeElement?.closest(".cv-tile");
      if (!tile) return false;
      this.zoom(Number(tile.dataset.unit));
    } else return false;
    return true;
  }

  zoom(unit) {
    const { run, layer } = this.app;
    const found = this.data?.units.find((u) => u.unit === unit);
    if (found) showZoom({ run: run.run, layer, step: this.data.step, unit, records: found.records });
  }

  async update() {
    const { state, run, layer } = this.app;
    fill(this.tabs, layerTabs(run, layer.name, (name) => this.app.navigate({ layer: name })));
    this.slider.update(layer.steps, state.step, run.restarts ?? []);
    this.sort.value = state.sort;
    this.patchSize.value = String(this.patch);
    fill(this.showSlot, showToggle(layer, state.show, (show) => this.app.navigate({ show })));
    const filtersShown = this.updateFilters(run, layer, state);
    // Asked for before the tiles are built, which takes a while on a large layer.
    const units = topk(run.run, layer.name, state.step);
    units.catch(() => {});  // handled below, once the tiles are built
    const show = effectiveShow(state.show, layer);
    const layerKey = JSON.stringify([run.run, layer.name, layer.units, layer.k, this.patch, show]);
    if (layerKey !== this.layerKey) {
      this.build(layer, layerKey);
      // A new grid is in unit order, so its mosaics, which need no records, load beside the units.
      if (state.sort === "unit" && !state.filter && show !== "projection") {
        for (const [unit, tile] of this.tiles) this.feed.assign(tile.img, mosaicUrl(run.run, layer.name, state.step, unit, this.patch));
      }
    }
    const seq = ++this.seq;
    this.grid.setAttribute("aria-busy", "true");
    let data;
    try {
      data = await units;
    } catch (e) {
      if (seq === this.seq) {
        fill(this.notice, message("error", "Could not load this layer", e.message));
        this.grid.setAttribute("aria-busy", "false");
      }
      return;
    }
    if (seq !== this.seq) return;
    fill(this.notice);
    this.data = data;
    fill(this.filterSlot,
      filterSelect(filterOptions(data.units, layer.k), state.filter ?? "", (filter) => this.app.navigate({ filter: filter || null })));
    this.showUnits(run, layer, data, state.sort, state.filter);
    await Promise.all([this.feed.settle(), filtersShown]);
    if (seq !== this.seq) return;
    this.grid.setAttribute("aria-busy", "false");
    this.prefetchNeighbours(run, layer, data.step);
  }

  /**
   * Warm the caches with the next and then the previous checkpoint: their units, and the mosaics of
   * the tiles near the window (every tile of a small layer), decoded and held until the next call,
   * so that stepping and play swap in images that are ready.
   */
  prefetchNeighbours(run, layer, step) {
    const show = effectiveShow(this.app.state.show, layer);
    const near = [...this.tiles].filter(([, tile]) => !tile.el.hidden && this.feed.isNear(tile.img)).map(([unit]) => unit);
    const i = layer.steps.indexOf(step);
    const held = new Map();
    for (const neighbour of [layer.steps[i + 1], layer.steps[i - 1]]) {
      if (neighbour === undefined) continue;
      topk(run.run, layer.name, neighbour).catch(() => {});  // a failure is shown if that step is opened
      const projected = show !== "patch" && hasProjection(layer, neighbour);
      for (const unit of near) {
        const urls = [show !== "projection" && mosaicUrl(run.run, layer.name, neighbour, unit, this.patch),
          projected && projectionMosaicUrl(run.run, layer.name, neighbour, unit, this.patch)];
        for (const url of urls.filter(Boolean)) held.set(url, this.ahead.get(url) ?? decodedAhead(url));
      }
    }
    this.ahead = held;
  }

  drawTile(tile, run, layer, data, unit) {
    const step = data.step;
    tile.img.alt = recordsAlt(unit.unit, step, unit.records);
    const show = effectiveShow(this.app.state.show, layer);
    const at = { run: run.run, layer, step, unit: unit.unit, records: unit.records, patch: this.patch };
    if (show === "projection") assignProjection(this.feed, tile.figure, at);
    else {
      tile.figure.setRecords(unit.records, { step, unit: unit.unit });
      this.feed.assign(tile.img, mosaicUrl(run.run, layer.name, step, unit.unit, this.patch));
    }
    if (tile.projection) {
      tile.projection.img.alt = `Unit ${unit.unit} at step ${step}: projections of its top records`;
      assignProjection(this.feed, tile.projection, at);
    }
    tile.el.classList.toggle("cv-unprojected", show !== "patch" && !hasProjection(layer, step));
    tile.el.classList.toggle("cv-dead", unit.dead);
    tile.el.classList.toggle("cv-not-finite", Boolean(unit.not_finite));
    fill(tile.meta,
      h("span", { class: "cv-unit" }, `#${unit.unit}`),
      unit.not_finite ? notFiniteChip()
        : unit.dead ? h("span", { class: "cv-chip cv-chip-dead", title: `peak activation is not positive on any ${imageNoun(currentSource())}` }, "dead")
        : changeChip(unit.overlap, layer.k, data.previous_step),
      h("span", { class: "cv-peak", title: `peak activation over the ${sourceName(currentSource()).toLowerCase()}` }, formatValue(unit.peak)),
    );
  }

  /** Pixels per patch in the tiles: the same for every layer, so deep layers are not drawn smaller. */
  get patch() {
    return this.app.state.patch ?? DEFAULT_PATCH;
  }

  build(layer, layerKey) {
    startMosaicGrid(this, layer, layerKey, this.patch);
    fill(this.jumpSlot, unitJump(layer, (unit) => this.app.navigate({ view: "unit", unit })));
    const tiles = [];
    const show = effectiveShow(this.app.state.show, layer);
    this.grid.classList.toggle("cv-grid-both", show === "both");
    for (let unit = 0; unit < layer.units; unit++) {
      const figure = new MosaicFigure(layer, this.patch, { alt: `Unit ${unit}` });
      // "both": the projections' mosaic beside the patches', at the same patch size, as in Fig. 2.
      const projection = show === "both" ? new MosaicFigure(layer, this.patch) : null;
      projection?.img.classList.add("cv-projection");
      const meta = h("span", { class: "cv-tile-meta" });
      const open = h("button", {
        type: "button", class: "cv-tile-open", title: `Unit ${unit}: open its evolution over training`,
        onclick: () => this.app.navigate({ view: "unit", unit }),
      }, projection ? h("span", { class: "cv-pair-images" }, h("span", { class: "cv-tile-image" }, figure.el),
        h("span", { class: "cv-tile-image" }, projection.el)) : h("span", { class: "cv-tile-image" }, figure.el), meta);
      const el = h("div", { class: "cv-tile", dataset: { unit: String(unit) } }, open,
        h("button", {
          type: "button", class: "cv-zoom-button", title: "Zoom: the patches large, with their probe images (z)",
          "aria-label": `Zoom unit ${unit}`, onclick: () => this.zoom(unit),
        }, "⤢"));
      for (const image of [figure.img, projection?.img].filter(Boolean)) {
        image.addEventListener("error", () => el.classList.add("cv-broken"));
        image.addEventListener("load", () => el.classList.remove("cv-broken"));
      }
      this.tiles.set(unit, { el, img: figure.img, figure, projection, meta });
      tiles.push(el);
    }
    fill(this.grid, ...tiles);
    // Which tiles are near the window is known by the time their units come.
    this.feed.watch([...this.tiles.values()].map((tile) => tile.img));
  }

  showUnits(run, layer, data, sort, filter) {
    const step = data.step;
    let shown = 0;
    for (const unit of data.units) {
      const tile = this.tiles.get(unit.unit);
      if (!tile) continue;
      tile.el.hidden = !passes(unit, filter);
      shown += !tile.el.hidden;
      // Tiles near the window are drawn now, the others once they come near: a 512-unit layer
      // switches checkpoints without redrawing hundreds of tiles no one sees.
      this.feed.whenNear(tile.img, () => this.drawTile(tile, run, layer, data, unit));
    }
    fill(this.notice, filter && !shown
      ? message("info", "No unit of this layer passes the filter", `at step ${step}. Choose "All units" to see every unit.`) : null);
    const order = sortUnits(data.units, sort).map((u) => this.tiles.get(u.unit)?.el).filter(Boolean);
    if (order.some((el, i) => this.grid.children[i] !== el)) this.grid.append(...order);
    const dead = data.units.filter((u) => u.dead).length;
    const notFinite = data.units.filter((u) => u.not_finite).length;
    const overlaps = data.units.map((u) => u.overlap).filter((o) => o != null);
    const mean = overlaps.length ? overlaps.reduce((a, b) => a + b, 0) / overlaps.length : null;
    fill(this.summary,
      filter ? h("b", {}, `${shown} of ${data.total_units} units shown · `) : null,
      `${data.total_units} units · top-${layer.k} over `,
      currentSource() === "probe" ? `${run.probe?.n ?? "?"} probe images · `
        : `the ${sourceName(currentSource()).toLowerCase()} since the previous checkpoint and its winners · `,
      mean == null ? "first checkpoint" : `${formatPercent(mean)} of top-${layer.k} kept since step ${data.previous_step}`,
      ` · ${dead} dead`,
      notFinite ? ` · ${notFinite} not finite` : "",
    );
  }
}
