// Compare: one layer at two checkpoints of a run, or at two runs. A is the run and step the
// other views show (`run`, `step`); B (`b_run`, `b_step`) defaults to A's previous checkpoint,
// or to the same step of another run. Across runs, units
// are matched one-to-one by the overlap of their top-k images (unit i of one seed is not
// unit i of another); within a run that is a toggle, which shows units that swapped roles.

import { h, fill, select, message, formatPercent } from "./dom.js";
import { getJson, mosaicUrl } from "./api.js";
import { layerTabs, startMosaicGrid, MosaicFigure, layerTitle, nearestStep, CHANGED_BELOW } from "./widgets.js";
import { showZoom } from "./zoom.js";
import { assignProjection, effectiveShow, showToggle } from "./show.js";

const PATCH_PX = 36;
// Pairs per `compare` request: the first page shows at once, later ones load as the list scrolls.
const PAGE_UNITS = 64;
export const ORDERS = [["change", "Least shared first"], ["unit", "Unit index"]];

// The backend matches layers of at most this many units (http_api.md, `compare`).
const MATCH_MAX_UNITS = 1024;

/** Whether units are matched: as the state says, else across runs yes and within a run no. */
export function matching(state, layer) {
  if ((layer?.units ?? 0) > MATCH_MAX_UNITS) return false;
  return (state.match ?? (state.b_run !== state.run ? "1" : "0")) === "1";
}

export class CompareView {
  constructor(app) {
    this.app = app;
    this.seq = 0;
    this.layerKey = null;
    this.tiles = new Map();
    this.feed = null;
    this.data = null;
    this.tabs = h("div", { class: "cv-tabs-slot" });
    this.controls = h("div", { class: "cv-toolbar cv-compare-controls" });
    this.summary = h("p", { class: "cv-summary" });
    this.notice = h("div", { class: "cv-notice" });
    this.grid = h("div", { class: "cv-grid cv-compare-grid", "aria-busy": "true", "aria-label": "Units compared" });
    this.more = h("button", { type: "button", class: "cv-button cv-more", hidden: true, onclick: () => this.loadMore() });
    // The next page loads when the end of the list comes near (re-observed after each page).
    this.moreObserver = new IntersectionObserver((entries) => {
      if (entries.some((e) => e.isIntersecting)) this.loadMore();
    }, { rootMargin: "600px" });
    this.el = h("section", { class: "cv-view cv-compare-view" },
      this.tabs, this.controls, this.summary, this.notice, this.grid, this.more);
  }

  destroy() {
    this.feed?.disconnect();
    this.moreObserver.disconnect();
  }

  async update() {
    const { state, run, layer, runs } = this.app;
    const other = runs.find((r) => r.run === state.b_run) ?? run;
    const otherLayer = other.layers.find((l) => l.name === layer.name);
    const match = matching(state, layer);
    fill(this.tabs, layerTabs(run, layer.name, (name) => this.app.navigate({ layer: name })));
    this.renderControls(run, layer, other, otherLayer, match);
    const seq = ++this.seq;
    if (!otherLayer) {
      this.showError(`Run ${other.run} has no layer ${layer.name}`, "Pick another run for B, or a layer both runs logged.");
      return;
    }
    const layerKey = JSON.stringify([run.run, other.run, layer.name, layer.units, layer.k, effectiveShow(state.show, layer)]);
    if (layerKey !== this.layerKey) this.build(layer, layerKey);
    this.grid.setAttribute("aria-busy", "true");
    const query = {
      run: run.run, layer: layer.name, step: state.step, other_run: other.run, other_step: state.b_step,
      match: match ? 1 : 0, order: state.order,
    };
    let data;
    try {
      data = await getJson("compare", { ...query, limit: PAGE_UNITS }, { cached: true });
    } catch (e) {
      if (seq === this.seq) this.showError("Could not compare these checkpoints", e.message);
      return;
    }
    if (seq !== this.seq) return;
    this.data = data;
    this.query = query;
    this.pairs = [...data.units];
    fill(this.notice);
    this.grid.hidden = false;
    this.showSummary(layer, data);
    fill(this.grid, this.showPairs(layer, otherLayer, data.units));
    this.updateMore();
    await this.feed.settle();
    if (seq === this.seq) this.grid.setAttribute("aria-busy", "false");
  }

  /** The next page of pairs, in the order shown. */
  async loadMore() {
    const { data, seq } = this;
    if (this.loading || !data || this.pairs.length >= data.total_units) return;
    this.loading = true;
    this.more.setAttribute("aria-busy", "true");
    let page;
    try {
      page = await getJson("compare", { ...this.query, offset: this.pairs.length, limit: PAGE_UNITS }, { cached: true });
    } catch (e) {
      if (seq === this.seq) fill(this.notice, message("error", "Could not load more units", e.message));
      return;
    } finally {
      this.loading = false;
      this.more.setAttribute("aria-busy", "false");
    }
    if (seq !== this.seq || this.data !== data) return;
    this.pairs.push(...page.units);
    const { layer } = this.app;
    const otherLayer = this.app.runs.find((r) => r.run === data.other_run)?.layers.find((l) => l.name === layer.name);
    this.grid.append(...this.showPairs(layer, otherLayer ?? layer, page.units));
    this.updateMore();
  }

  updateMore() {
    const left = this.data.total_units - this.pairs.length;
    this.more.hidden = left <= 0;
    this.more.textContent = `Show more units (${left} of ${this.data.total_units} not shown yet)`;
    this.moreObserver.unobserve(this.more);
    if (left > 0) this.moreObserver.observe(this.more);
  }

  showError(title, detail) {
    fill(this.notice, message("error", title, detail));
    fill(this.summary);
    this.grid.hidden = true;
    this.grid.setAttribute("aria-busy", "false");
    this.more.hidden = true;
  }

  renderControls(run, layer, other, otherLayer, match) {
    const { state, runs } = this.app;
    const runOptions = runs.map((r) => [r.run, r.run]);
    const stepOptions = (steps) => steps.map((s) => [s, `step ${s}`]);
    const stepsOf = (name) => runs.find((r) => r.run === name)?.layers.find((l) => l.name === layer.name)?.steps ?? [];
    const side = (name, runSelect, stepSelect) =>
      h("div", { class: "cv-compare-side" }, h("span", { class: `cv-side-badge cv-side-${name}` }, name), runSelect, stepSelect);
    fill(this.controls,
      side("A",
        // A new run for a side keeps that side's step where the run has it, else takes the nearest one.
        select(runOptions, run.run, (value) => this.app.navigate({
          run: value, step: nearestStep(stepsOf(value), state.step),
        }), { "aria-label": "Run A" }),
        select(stepOptions(layer.steps), state.step, (value) => this.app.navigate({ step: Number(value) }), { "aria-label": "Step A" })),
      h("button", {
        type: "button", class: "cv-button", title: "Swap A and B",
        onclick: () => this.app.navigate({ run: other.run, step: state.b_step, b_run: run.run, b_step: state.step }),
      }, "⇄"),
      side("B",
        select(runOptions, other.run, (value) => this.app.navigate({
          b_run: value, b_step: nearestStep(stepsOf(value), state.b_step),
        }), { "aria-label": "Run B" }),
        select(stepOptions(otherLayer?.steps ?? []), state.b_step, (value) => this.app.navigate({ b_step: Number(value) }),
          { "aria-label": "Step B", disabled: !otherLayer })),
      h("label", {
        class: "cv-field cv-toggle",
        title: layer.units > MATCH_MAX_UNITS ? `Matching is limited to layers of ${MATCH_MAX_UNITS} units`
          : "Pair each unit of A with the unit of B whose top-k images overlap most (one-to-one)",
      },
        h("input", {
          type: "checkbox", checked: match, "aria-label": "Match units by top-k overlap", disabled: layer.units > MATCH_MAX_UNITS,
          onchange: (e) => this.app.navigate({ match: e.target.checked ? "1" : "0" }),
        }), "Match units"),
      h("label", { class: "cv-field" }, "Sort by",
        select(ORDERS, state.order, (order) => this.app.navigate({ order }), { "aria-label": "Sort units by" })),
      showToggle(layer, state.show, (show) => this.app.navigate({ show })),
    );
  }

  build(layer, layerKey) {
    startMosaicGrid(this, layer, layerKey, PATCH_PX);
    // "both": each side's projections beside its patches.
    this.grid.classList.toggle("cv-grid-both", effectiveShow(this.app.state.show, layer) === "both");
    fill(this.grid);
  }

  /** The tile of unit `unit` of A, made the first time a page holds it. */
  tile(layer, unit) {
    const made = this.tiles.get(unit);
    if (made) return made;
    const show = effectiveShow(this.app.state.show, layer);
    const side = (name) => {
      const figure = new MosaicFigure(layer, PATCH_PX);
      const projection = show === "both" ? new MosaicFigure(layer, PATCH_PX) : null;
      projection?.img.classList.add("cv-projection");
      const label = h("span", { class: "cv-side-label" });
      const button = h("button", {
        type: "button", class: "cv-side-image", onclick: () => this.zoom(unit, name),
      }, [figure, projection].filter(Boolean).map((f) => h("span", { class: "cv-tile-image" }, f.el)));
      return { figure, projection, label, el: h("span", { class: `cv-side cv-side-${name}` }, label, button), button };
    };
    const a = side("A");
    const b = side("B");
    const meta = h("span", { class: "cv-tile-meta" });
    const el = h("div", { class: "cv-tile cv-pair", dataset: { unit: String(unit) } },
      h("span", { class: "cv-pair-images" }, a.el, b.el), meta);
    const tile = { el, a, b, meta };
    this.tiles.set(unit, tile);
    return tile;
  }

  /** Zoom into one side of unit `unit`'s pair, outlining the images both sides share. */
  zoom(unit, name) {
    const { layer } = this.app;
    const pair = this.pairs?.find((u) => u.unit === unit);
    if (!pair) return;
    const isA = name === "A";
    const records = (isA ? pair.records : pair.other_records) ?? [];
    showZoom({
      run: isA ? this.data.run : this.data.other_run, layer, step: isA ? this.data.step : this.data.other_step,
      unit: isA ? unit : pair.other_unit, records, highlight: isA ? pair.ranks : pair.other_ranks, side: name,
    });
  }

  /** The tiles of `pairs`, drawn; `otherLayer`: the layer in B's run (its projections may have been logged at other steps). */
  showPairs(layer, otherLayer, pairs) {
    const { data } = this;
    const k = layer.k;
    const same = data.run === data.other_run;
    return pairs.map((unit) => {
      const tile = this.tile(layer, unit.unit);
      const isChanged = unit.overlap != null && unit.overlap < CHANGED_BELOW;
      const unique = data.matched && unit.overlap === 0;
      const partner = unit.other_unit;
      this.showSide(tile.a, "A", data.run, layer, data.step, unit.unit, unit.records, unit.ranks);
      this.showSide(tile.b, "B", data.other_run, otherLayer, data.other_step, partner, unit.other_records, unit.other_ranks);
      tile.el.classList.toggle("cv-changed", isChanged && !data.matched);
      tile.el.classList.toggle("cv-unique", unique);
      tile.el.dataset.otherUnit = String(partner);
      const shared = unit.shared?.length ?? Math.round((unit.overlap ?? 0) * k);
      fill(tile.meta,
        unique ? h("span", { class: "cv-chip cv-chip-unique", title: "The one-to-one matching found no unit of B that shares one of its top-k images" }, "unique feature")
          : isChanged && !data.matched ? h("span", { class: "cv-chip cv-chip-changed", style: { "--change": String(1 - unit.overlap) } }, "changed") : null,
        same && partner !== unit.unit ? h("span", { class: "cv-chip cv-chip-moved", title: `Unit ${unit.unit} of A is matched with unit ${partner} of B` },
          `#${unit.unit} ↔ #${partner}`) : null,
        h("span", { class: "cv-overlap", title: `${shared} of their top-${k} images appear in both` },
          h("span", { class: "cv-meter", "aria-hidden": "true" }, h("span", { style: { width: formatPercent(unit.overlap ?? 0) } })),
          `${shared}/${k} shared`),
        h("button", {
          type: "button", class: "cv-button cv-open-unit", title: `Open unit ${unit.unit} of A (${data.run}) over training`,
          onclick: () => this.app.navigate({ view: "unit", unit: unit.unit }),
        }, "›"),
      );
      return tile.el;
    });
  }

  /** Counts over every unit, from the per-unit shared counts and partners that each page carries. */
  showSummary(layer, data) {
    const k = layer.k;
    const same = data.run === data.other_run;
    const changed = data.shared_counts.filter((count) => count / k < CHANGED_BELOW).length;
    const moved = data.other_units.filter((partner, unit) => partner !== unit).length;
    fill(this.summary,
      `${layerTitle(layer)}: `,
      h("b", {}, "A ", same ? `step ${data.step}` : `${data.run} @ ${data.step}`), " vs ",
      h("b", {}, "B ", same ? `step ${data.other_step}` : `${data.other_run} @ ${data.other_step}`),
      data.matched
        ? [` · units matched one-to-one by top-${k} overlap: mean ${formatPercent(data.mean_overlap)} shared`,
          ` (unit for unit: ${formatPercent(data.unit_for_unit_mean_overlap)}) · `,
          h("b", { class: "cv-accent" }, `${data.unique} unique features`), ` (their match in B shares no image)`,
          same ? ` · ${moved} units matched to another index` : null]
        : [` · unit for unit: mean top-${k} overlap ${formatPercent(data.mean_overlap)} · `,
          h("b", { class: "cv-accent" }, `${changed} of ${data.total_units} units changed`),
          ` (fewer than ${formatPercent(CHANGED_BELOW)} of their top-${k} shared)`],
      ". Outlined patches: images in both top-k sets.",
    );
  }

  showSide(side, name, run, layer, step, unit, records, ranks) {
    const at = { run, layer, step, unit, records: records ?? [], patch: PATCH_PX, highlight: ranks ?? [] };
    side.figure.img.alt = `${name}: unit ${unit}, top patches of ${run} at step ${step}`;
    if (effectiveShow(this.app.state.show, this.app.layer) === "projection") {
      side.figure.img.alt = `${name}: unit ${unit}, projections of its top records in ${run} at step ${step}`;
      assignProjection(this.feed, side.figure, at);
    } else {
      side.figure.setRecords(at.records, { highlight: at.highlight, step, unit });
      this.feed.assign(side.figure.img, mosaicUrl(run, layer.name, step, unit, PATCH_PX));
    }
    if (side.projection) {
      side.projection.img.alt = `${name}: unit ${unit}, projections of its top records in ${run} at step ${step}`;
      assignProjection(this.feed, side.projection, at);
    }
    fill(side.label, h("b", {}, name), ` #${unit}`);
    side.label.title = `${name}: ${run} at step ${step}, unit ${unit}`;
    side.button.title = `${name}: unit ${unit} of ${run} at step ${step}. Click to zoom`;
  }
}
