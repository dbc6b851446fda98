// Layer grid (Zeiler & Fergus Fig. 2): one tile per unit with its top-k mosaic at a checkpoint.

import { h, fill, select, message, formatValue, formatPercent } from "./dom.js";
import { topk, mosaicUrl } from "./api.js";
import { layerTabs, StepSlider, LAZY_UNITS, startMosaicGrid, fitImage, recordsAlt } from "./widgets.js";
import { effectiveShow, hasProjection, projectionMosaicUrl, showToggle } from "./show.js";
import { FiltersPanel, filtersToggle } from "./filters.js";

const TILE_PX = 128;
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

export class GridView {
  constructor(app) {
    this.app = app;
    this.seq = 0;
    this.layerKey = null;
    this.tiles = new Map();
    this.feed = null;
    this.slider = new StepSlider({ onChange: (step) => app.navigate({ step }) });
    this.tabs = h("div", { class: "cv-tabs-slot" });
    this.sort = select(SORTS, "unit", (sort) => app.navigate({ sort }), { "aria-label": "Sort units by" });
    this.summary = h("p", { class: "cv-summary" });
    this.notice = h("div", { class: "cv-notice" });
    this.showSlot = h("span", { class: "cv-show-slot" });
    this.filtersSlot = h("div", { class: "cv-filters-slot" });
    this.filters = null;
    this.grid = h("div", { class: "cv-grid", "aria-busy": "true", "aria-label": "Units" });
    this.el = h("section", { class: "cv-view cv-grid-view" },
      this.tabs,
      h("div", { class: "cv-toolbar" }, this.slider.el, h("label", { class: "cv-field" }, "Sort by", this.sort), this.showSlot),
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
    else return false;
    return true;
  }

  async update() {
    const { state, run, layer } = this.app;
    fill(this.tabs, layerTabs(run, layer.name, (name) => this.app.navigate({ layer: name })));
    this.slider.update(layer.steps, state.step);
    this.sort.value = state.sort;
    fill(this.showSlot, showToggle(layer, state.show, (show) => this.app.navigate({ show })));
    const filtersShown = this.updateFilters(run, layer, state);
    const layerKey = JSON.stringify([run.run, layer.name, layer.units, effectiveShow(state.show, layer)]);
    if (layerKey !== this.layerKey) this.build(layer, layerKey);
    const seq = ++this.seq;
    this.grid.setAttribute("aria-busy", "true");
    let data;
    try {
      data = await topk(run.run, layer.name, state.step);
    } catch (e) {
      if (seq === this.seq) {
        fill(this.notice, message("error", "Could not load this layer", e.message));
        this.grid.setAttribute("aria-busy", "false");
      }
      return;
    }
    if (seq !== this.seq) return;
    fill(this.notice);
    this.showUnits(run, layer, data, state.sort);
    await Promise.all([this.feed.settle(), filtersShown]);
    if (seq !== this.seq) return;
    this.grid.setAttribute("aria-busy", "false");
    this.prefetchNext(run, layer, data.step);
  }

  /** Warm the browser's cache with the next checkpoint's mosaics, so stepping forward and play are quick. */
  prefetchNext(run, layer, step) {
    const next = layer.steps[layer.steps.indexOf(step) + 1];
    if (next === undefined || layer.units >= LAZY_UNITS) return;
    for (let unit = 0; unit < layer.units; unit++) {
      const img = new Image();
      img.fetchPriority = "low";
      img.src = mosaicUrl(run.run, layer.name, next, unit);
    }
  }

  build(layer, layerKey) {
    startMosaicGrid(this, layer, layerKey, TILE_PX);
    const tiles = [];
    const show = effectiveShow(this.app.state.show, layer);
    for (let unit = 0; unit < layer.units; unit++) {
      const img = fitImage(h("img", { class: "cv-mosaic", alt: `Unit ${unit}`, decoding: "async" }), TILE_PX);
      // "both": the projections' mosaic beside the patches', as in Fig. 2.
      const projection = show === "both"
        ? fitImage(h("img", { class: "cv-mosaic cv-projection", alt: "", decoding: "async" }), TILE_PX) : null;
      const meta = h("span", { class: "cv-tile-meta" });
      const el = h("button", {
        type: "button", class: show === "both" ? "cv-tile cv-pair" : "cv-tile", dataset: { unit: String(unit) },
        onclick: () => this.app.navigate({ view: "unit", unit }),
      }, projection ? h("span", { class: "cv-pair-images" }, h("span", { class: "cv-tile-image" }, img),
        h("span", { class: "cv-tile-image" }, projection)) : h("span", { class: "cv-tile-image" }, img), meta);
      for (const image of [img, projection].filter(Boolean)) {
        image.addEventListener("error", () => el.classList.add("cv-broken"));
        image.addEventListener("load", () => el.classList.remove("cv-broken"));
      }
      this.tiles.set(unit, { el, img, projection, meta });
      tiles.push(el);
    }
    fill(this.grid, ...tiles);
  }

  showUnits(run, layer, data, sort) {
    const step = data.step;
    for (const unit of data.units) {
      const tile = this.tiles.get(unit.unit);
      if (!tile) continue;
      tile.img.alt = recordsAlt(unit.unit, step, unit.records);
      const show = effectiveShow(this.app.state.show, layer);
      const projected = projectionMosaicUrl(run.run, layer.name, step, unit.unit);
      this.feed.assign(tile.img, show === "projection" ? projected : mosaicUrl(run.run, layer.name, step, unit.unit));
      if (tile.projection) {
        tile.projection.alt = `Unit ${unit.unit} at step ${step}: projections of its top records`;
        this.feed.assign(tile.projection, projected);
      }
      tile.el.classList.toggle("cv-unprojected", show !== "patch" && !hasProjection(layer, step));
      tile.el.classList.toggle("cv-dead", unit.dead);
      tile.el.classList.toggle("cv-not-finite", Boolean(unit.not_finite));
      tile.el.title = `Unit ${unit.unit}: open its evolution over training`;
      fill(tile.meta,
        h("span", { class: "cv-unit" }, `#${unit.unit}`),
        unit.not_finite ? notFiniteChip()
          : unit.dead ? h("span", { class: "cv-chip cv-chip-dead", title: "peak activation is not positive on any probe image" }, "dead")
          : changeChip(unit.overlap, layer.k, data.previous_step),
        h("span", { class: "cv-peak", title: "peak activation over the probe set" }, formatValue(unit.peak)),
      );
    }
    this.grid.append(...sortUnits(data.units, sort).map((u) => this.tiles.get(u.unit)?.el).filter(Boolean));
    const dead = data.units.filter((u) => u.dead).length;
    const notFinite = data.units.filter((u) => u.not_finite).length;
    const overlaps = data.units.map((u) => u.overlap).filter((o) => o != null);
    const mean = overlaps.length ? overlaps.reduce((a, b) => a + b, 0) / overlaps.length : null;
    fill(this.summary,
      `${data.total_units} units · top-${layer.k} over ${run.probe?.n ?? "?"} probe images · `,
      mean == null ? "first checkpoint" : `${formatPercent(mean)} of top-${layer.k} kept since step ${data.previous_step}`,
      ` · ${dead} dead`,
      notFinite ? ` · ${notFinite} not finite` : "",
    );
  }
}
