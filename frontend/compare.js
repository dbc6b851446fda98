// Compare: one layer at two checkpoints of a run, or at the same step of two runs. B is the
// run and step the other views show; A, the reference, defaults to B's previous checkpoint.

import { h, fill, select, message, formatPercent } from "./dom.js";
import { allUnits, mosaicUrl } from "./api.js";
import { layerTabs, startMosaicGrid, fitImage, layerTitle } from "./widgets.js";
import { sortUnits } from "./grid.js";

const MOSAIC_PX = 104;
// Units that keep fewer than half of their top-k images count as changed.
const CHANGED_BELOW = 0.5;
export const ORDERS = [["change", "Most changed first"], ["unit", "Unit index"]];

export class CompareView {
  constructor(app) {
    this.app = app;
    this.seq = 0;
    this.layerKey = null;
    this.tiles = new Map();
    this.feed = null;
    this.tabs = h("div", { class: "cv-tabs-slot" });
    this.controls = h("div", { class: "cv-toolbar cv-compare-controls" });
    this.summary = h("p", { class: "cv-summary" });
    this.notice = h("div", { class: "cv-notice" });
    this.grid = h("div", { class: "cv-grid cv-compare-grid", "aria-busy": "true", "aria-label": "Units compared" });
    this.el = h("section", { class: "cv-view cv-compare-view" }, this.tabs, this.controls, this.summary, this.notice, this.grid);
  }

  destroy() {
    this.feed?.disconnect();
  }

  async update() {
    const { state, run, layer, runs } = this.app;
    const other = runs.find((r) => r.run === state.other_run) ?? run;
    const otherLayer = other.layers.find((l) => l.name === layer.name);
    fill(this.tabs, layerTabs(run, layer.name, (name) => this.app.navigate({ layer: name })));
    this.renderControls(run, layer, other, otherLayer);
    const seq = ++this.seq;
    if (!otherLayer) {
      this.showError(`Run ${other.run} has no layer ${layer.name}`, "Pick another run for A, or a layer both runs logged.");
      return;
    }
    const layerKey = JSON.stringify([run.run, other.run, layer.name, layer.units]);
    if (layerKey !== this.layerKey) this.build(layer, layerKey);
    this.grid.setAttribute("aria-busy", "true");
    let data;
    try {
      data = await allUnits("compare", {
        run: other.run, layer: layer.name, step: state.other_step, other_run: run.run, other_step: state.step,
      });
    } catch (e) {
      if (seq === this.seq) this.showError("Could not compare these checkpoints", e.message);
      return;
    }
    if (seq !== this.seq) return;
    fill(this.notice);
    this.grid.hidden = false;
    this.showUnits(layer, data, state.order);
    await this.feed.settle();
    if (seq === this.seq) this.grid.setAttribute("aria-busy", "false");
  }

  showError(title, detail) {
    fill(this.notice, message("error", title, detail));
    fill(this.summary);
    this.grid.hidden = true;
    this.grid.setAttribute("aria-busy", "false");
  }

  renderControls(run, layer, other, otherLayer) {
    const { state, runs } = this.app;
    const runOptions = runs.map((r) => [r.run, r.run]);
    const stepOptions = (steps) => steps.map((s) => [s, `step ${s}`]);
    const side = (name, runSelect, stepSelect) =>
      h("div", { class: "cv-compare-side" }, h("span", { class: "cv-side-badge" }, name), runSelect, stepSelect);
    fill(this.controls,
      side("A",
        select(runOptions, other.run, (value) => this.app.navigate({ other_run: value }), { "aria-label": "Run A" }),
        select(stepOptions(otherLayer?.steps ?? []), state.other_step, (value) => this.app.navigate({ other_step: Number(value) }),
          { "aria-label": "Step A", disabled: !otherLayer })),
      h("button", {
        type: "button", class: "cv-button", title: "Swap A and B",
        onclick: () => this.app.navigate({ run: other.run, step: state.other_step, other_run: run.run, other_step: state.step }),
      }, "⇄"),
      side("B",
        select(runOptions, run.run, (value) => this.app.navigate({ run: value }), { "aria-label": "Run B" }),
        select(stepOptions(layer.steps), state.step, (value) => this.app.navigate({ step: Number(value) }), { "aria-label": "Step B" })),
      h("label", { class: "cv-field" }, "Sort by",
        select(ORDERS, state.order, (order) => this.app.navigate({ order }), { "aria-label": "Sort units by" })),
    );
  }

  build(layer, layerKey) {
    startMosaicGrid(this, layer, layerKey, MOSAIC_PX);
    const tiles = [];
    for (let unit = 0; unit < layer.units; unit++) {
      const mosaic = () => fitImage(h("img", { class: "cv-mosaic", alt: "", decoding: "async" }), MOSAIC_PX);
      const a = mosaic();
      const b = mosaic();
      const meta = h("span", { class: "cv-tile-meta" });
      const el = h("button", {
        type: "button", class: "cv-tile cv-pair", dataset: { unit: String(unit) },
        title: `Unit ${unit}: open its evolution over training`,
        onclick: () => this.app.navigate({ view: "unit", unit }),
      }, h("span", { class: "cv-pair-images" }, h("span", { class: "cv-tile-image" }, a), h("span", { class: "cv-tile-image" }, b)), meta);
      this.tiles.set(unit, { el, a, b, meta });
      tiles.push(el);
    }
    fill(this.grid, ...tiles);
  }

  showUnits(layer, data, order) {
    const k = layer.k;
    let changed = 0;
    for (const unit of data.units) {
      const tile = this.tiles.get(unit.unit);
      if (!tile) continue;
      const isChanged = unit.overlap != null && unit.overlap < CHANGED_BELOW;
      changed += isChanged;
      tile.a.alt = `Unit ${unit.unit}, top-${k} patches of ${data.run} at step ${data.step}`;
      tile.b.alt = `Unit ${unit.unit}, top-${k} patches of ${data.other_run} at step ${data.other_step}`;
      this.feed.assign(tile.a, mosaicUrl(data.run, data.layer, data.step, unit.unit));
      this.feed.assign(tile.b, mosaicUrl(data.other_run, data.layer, data.other_step, unit.unit));
      tile.el.classList.toggle("cv-changed", isChanged);
      const shared = unit.shared?.length ?? Math.round((unit.overlap ?? 0) * k);
      fill(tile.meta,
        h("span", { class: "cv-unit" }, `#${unit.unit}`),
        isChanged ? h("span", { class: "cv-chip cv-chip-changed", style: { "--change": String(1 - unit.overlap) } }, "changed") : null,
        h("span", { class: "cv-overlap", title: `${shared} of its top-${k} images appear in both` },
          h("span", { class: "cv-meter", "aria-hidden": "true" }, h("span", { style: { width: formatPercent(unit.overlap ?? 0) } })),
          `${shared}/${k} shared`),
      );
    }
    this.grid.append(...sortUnits(data.units, order).map((u) => this.tiles.get(u.unit)?.el).filter(Boolean));
    const same = data.run === data.other_run;
    fill(this.summary,
      `${layerTitle(layer)}: `,
      h("b", {}, same ? `step ${data.step}` : `${data.run} @ ${data.step}`), " vs ",
      h("b", {}, same ? `step ${data.other_step}` : `${data.other_run} @ ${data.other_step}`),
      ` · mean top-${k} overlap ${formatPercent(data.mean_overlap)} · `,
      h("b", { class: "cv-accent" }, `${changed} of ${data.units.length} units changed`),
      ` (fewer than ${formatPercent(CHANGED_BELOW)} of their top-${k} shared)`,
    );
  }
}
