// Stability overview (Zeiler & Fergus Fig. 4's finding): which layers have settled, and dead units.

import { h, fill, message, formatPercent } from "./dom.js";
import { getJson } from "./api.js";
import { lineChart } from "./chart.js";
import { layerTitle } from "./widgets.js";

// Which overlap curve to draw: with the latest checkpoint (default) or with the previous one.
export const AGAINST = [["final", "Latest checkpoint"], ["previous", "Previous checkpoint"]];
const CURVES = {
  final: {
    key: "final_overlap",
    with: "the latest checkpoint",
    title: "Top-k overlap with the latest checkpoint",
    caption: "Mean fraction of each unit's top-k images that are also in its top-k at the latest checkpoint: " +
      "how far each layer has converged toward its current features (100% at the latest checkpoint by definition). " +
      "In Zeiler & Fergus (Fig. 4) lower layers converge within a few epochs, higher ones much later.",
  },
  previous: {
    key: "topk_overlap",
    with: "the previous checkpoint",
    title: "Top-k overlap with the previous checkpoint",
    caption: "Mean fraction of each unit's top-k images that were already in its top-k one checkpoint earlier. " +
      "It depends on the schedule too: the gap between checkpoints grows during training, so later points compare " +
      "states further apart. A layer whose line stays near 100% has settled.",
  },
};

// A layer counts as settled from the first checkpoint after which the chart's overlap stays at or above this.
const SETTLED_OVERLAP = 0.8;

/**
 * The step from which `overlap` stays >= SETTLED_OVERLAP up to the latest checkpoint, or null while
 * it still changes. The latest checkpoint alone never counts: against itself its overlap is 100% by
 * definition, and one value against the previous checkpoint is no trend.
 */
function settledSince(steps, overlap) {
  let since = steps.length;
  while (since > 0 && overlap[since - 1] != null && overlap[since - 1] >= SETTLED_OVERLAP) since--;
  return since < steps.length - 1 ? steps[since] : null;
}

const seriesClass = (layer) => `cv-layer-${((layer.index - 1) % 5) + 1}`;
const last = (values) => values.length ? values[values.length - 1] : null;

export class StabilityView {
  constructor(app) {
    this.app = app;
    this.seq = 0;
    this.body = h("div", { class: "cv-stability-body", "aria-busy": "true" });
    this.el = h("section", { class: "cv-view cv-stability-view" }, this.body);
  }

  destroy() {}

  async update() {
    const { run } = this.app;
    const seq = ++this.seq;
    this.body.setAttribute("aria-busy", "true");
    let stats;
    try {
      stats = await getJson("stats", { run: run.run });
    } catch (e) {
      if (seq === this.seq) fill(this.body, message("error", "Could not load the stability statistics", e.message));
      return;
    }
    if (seq !== this.seq) return;
    fill(this.body, ...this.render(stats));
    this.body.setAttribute("aria-busy", "false");
  }

  render(stats) {
    const layers = stats.layers.filter((l) => l.steps.length);
    if (!layers.length) return [message("info", "No checkpoints yet", "The statistics appear after the first logged checkpoint.")];
    const openLayer = (layer, step) => this.app.navigate({ view: "grid", layer: layer.name, step });
    const series = (key) => layers.map((layer) => ({
      label: `${layerTitle(layer)} (${layer.name})`, className: seriesClass(layer), layer,
      points: layer.steps.map((step, i) => [step, layer[key][i]]),
    }));
    const maxDead = Math.max(0, ...layers.flatMap((l) => l.dead_fraction.filter((v) => v != null)));
    const deadMax = Math.min(1, Math.max(0.1, Math.ceil(maxDead * 10) / 10));
    const onPoint = (s, step) => openLayer(s.layer, step);
    const against = this.app.state.against ?? AGAINST[0][0];
    const curve = CURVES[against];
    const toggle = h("div", { class: "cv-segmented", role: "radiogroup", "aria-label": "Overlap with" },
      AGAINST.map(([key, label]) => h("button", {
        type: "button", role: "radio", "aria-checked": String(key === against), class: "cv-segment",
        onclick: () => this.app.navigate({ against: key }),
      }, label)));
    const legend = h("div", { class: "cv-legend" }, layers.map((layer) =>
      h("button", { type: "button", class: `cv-legend-item ${seriesClass(layer)}`, onclick: () => openLayer(layer) },
        h("span", { class: "cv-swatch", "aria-hidden": "true" }), layerTitle(layer), h("span", { class: "cv-dim cv-name" }, layer.name))));
    return [
      h("div", { class: "cv-cards" },
        h("div", { class: "cv-card cv-card-wide" },
          h("div", { class: "cv-card-head" }, h("h2", {}, curve.title), h("span", { class: "cv-spacer" }),
            h("span", { class: "cv-field" }, "Overlap with", toggle)),
          h("p", { class: "cv-caption" }, curve.caption),
          lineChart({
            series: series(curve.key), title: `${curve.title}, per layer`,
            yFormat: formatPercent, xLabel: "step", onPoint,
          }),
          legend),
        h("div", { class: "cv-card" },
          h("h2", {}, "Dead units"),
          h("p", { class: "cv-caption" }, "Fraction of units whose peak activation over the probe set is not positive."),
          lineChart({
            series: series("dead_fraction"), yMax: deadMax, width: 400, height: 170,
            title: "Dead-unit fraction per layer", yFormat: formatPercent, xLabel: "step", onPoint,
          }))),
      this.fieldCard(layers, series, onPoint),
      h("div", { class: "cv-card" }, h("h2", {}, "Per layer, at the latest checkpoint"), this.table(layers, openLayer, curve),
        h("p", { class: "cv-caption cv-settled-note" },
          `Settled: from that step on, every checkpoint's top-k shares at least ${formatPercent(SETTLED_OVERLAP)} with `,
          `${curve.with} (the curve above; switch it with "Overlap with"). The latest checkpoint alone does not count.`)),
    ];
  }

  /** The effective receptive field over training (Luo et al. predict it grows), or null for a run without it. */
  fieldCard(layers, series, onPoint) {
    const measured = layers.filter((l) => l.effective_field.some((v) => v != null));
    if (!measured.length) return null;
    const top = Math.max(...measured.flatMap((l) => l.effective_field.filter((v) => v != null)));
    return h("div", { class: "cv-card cv-card-wide cv-field-card" },
      h("h2", {}, "Effective receptive field"),
      h("p", { class: "cv-caption" }, "Side in input pixels of the box that holds most of the input-gradient mass of a " +
        "centre unit, measured at each checkpoint (the theoretical field bounds it). Luo et al. (2016) find that it " +
        "grows during training."),
      lineChart({
        series: series("effective_field").filter((s) => measured.includes(s.layer)), yMax: Math.max(8, Math.ceil(top * 1.1)),
        title: "Effective receptive field per layer (px)", yFormat: (v) => `${Math.round(v)} px`, xLabel: "step", onPoint,
      }));
  }

  /** `curve`: the chart's, which the Settled column measures too. */
  table(layers, openLayer, curve) {
    const settled = `Settled (≥ ${formatPercent(SETTLED_OVERLAP)} with ${curve.with.replace("the ", "")})`;
    return h("table", { class: "cv-table" },
      h("thead", {}, h("tr", {}, ["Layer", "Units", "Overlap with previous, now", "Dead now", settled]
        .map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, layers.map((layer) => {
        const info = this.app.run.layers.find((l) => l.name === layer.name);
        const since = settledSince(layer.steps, layer[curve.key]);
        return h("tr", {},
          h("th", { scope: "row" }, h("button", { type: "button", class: `cv-link ${seriesClass(layer)}`, onclick: () => openLayer(layer) },
            h("span", { class: "cv-swatch", "aria-hidden": "true" }), layerTitle(layer), " ", h("span", { class: "cv-dim cv-name" }, layer.name))),
          h("td", {}, String(info?.units ?? "–")),
          h("td", {}, formatPercent(last(layer.topk_overlap))),
          h("td", {}, formatPercent(last(layer.dead_fraction))),
          h("td", { class: "cv-settled" }, since == null ? "still changing" : `since step ${since}`));
      })));
  }
}
