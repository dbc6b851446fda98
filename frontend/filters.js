// Layer-1 filters (Zeiler & Fergus Fig. 6): the first convolution's weights as RGB tiles, each
// contrast-normalised on its own, with a slider over training and the dominant / near-zero ones named.

import { h, fill, message } from "./dom.js";
import { getJson, routeUrl, screenSize } from "./api.js";
import { StepSlider, DEFAULT_PATCH } from "./widgets.js";
import { NOT_LOGGED } from "./show.js";
import { zoomDialog } from "./zoom.js";

// The filter_mosaic route's largest tile; larger tiles are that one scaled up, pixels kept square.
const MAX_TILE = 128;

/**
 * Point `img` at the filter mosaic drawn with `css`-pixel tiles: fetched at the screen's
 * resolution up to the route's largest tile, and scaled (crisply) to the size asked for.
 */
function showFilterMosaic(img, run, step, css) {
  const size = Math.min(MAX_TILE, screenSize(css));
  img.onload = () => { img.style.width = `${Math.round((img.naturalWidth * css) / size)}px`; };
  img.src = routeUrl("filter_mosaic", { run, step, size });
}

/** The "Filters" toggle of the Layer 1 tab; disabled, saying why, when the run has none. */
export function filtersToggle(run, on, onChange) {
  const logged = !!run.filters;
  return h("button", {
    type: "button", class: "cv-button cv-filters-toggle", "aria-pressed": String(logged && on), disabled: !logged,
    title: logged ? `The weights of ${run.filters.module}, the first convolution` : `Filters: ${NOT_LOGGED}`,
    onclick: () => onChange(!on),
  }, logged ? "Filters (Fig. 6)" : `Filters: ${NOT_LOGGED}`);
}

export class FiltersPanel {
  constructor(app) {
    this.app = app;
    this.seq = 0;
    this.slider = new StepSlider({ onChange: (step) => app.navigate({ filter_step: step }), label: "Filter checkpoint" });
    this.img = h("img", { class: "cv-filter-mosaic cv-pixelated", alt: "" });
    const open = h("button", {
      type: "button", class: "cv-filter-open", title: "Zoom: the filters large (z)", onclick: () => this.zoom(),
    }, this.img);
    this.facts = h("div", { class: "cv-filter-facts" });
    this.el = h("div", { class: "cv-card cv-filters", "aria-busy": "true" },
      h("h3", {}, "First-layer filters"), this.slider.el,
      h("div", { class: "cv-filters-body" }, h("div", { class: "cv-filter-frame" }, open), this.facts));
  }

  async update(run, state) {
    const steps = run.filters.steps;
    const step = steps.includes(state.filter_step) ? state.filter_step : steps.at(-1);
    this.slider.update(steps, step);
    const seq = ++this.seq;
    this.el.setAttribute("aria-busy", "true");
    let data;
    try {
      data = await getJson("filters", { run: run.run, step }, { cached: true });
    } catch (e) {
      if (seq === this.seq) fill(this.facts, message("error", "Could not load the filters", e.message));
      this.el.setAttribute("aria-busy", "false");
      return;
    }
    if (seq !== this.seq) return;
    this.data = data;
    this.img.alt = `${data.shape[0]} filters of ${data.module} at step ${step}`;
    // Tiles as large as the layer grid's patches: the Patch size control sets both.
    showFilterMosaic(this.img, run.run, step, state.patch ?? DEFAULT_PATCH);
    const list = (units) => (units.length ? units.map((u) => `#${u}`).join(", ") : "none");
    fill(this.facts, h("dl", { class: "cv-facts" },
      h("dt", {}, "Module"), h("dd", {}, `${data.module} · ${data.shape.join("×")}`),
      h("dt", {}, "Dominant"), h("dd", { class: data.dominant.length ? "cv-accent cv-dominant" : "cv-dominant" },
        `${data.dominant.length}: ${list(data.dominant)}`),
      h("dt", {}, "Near zero"), h("dd", { class: "cv-near-zero" }, `${data.near_zero.length}: ${list(data.near_zero)}`)),
    h("p", { class: "cv-caption" },
      `Each tile is one filter, contrast-normalised on its own. Dominant: RMS above ${data.dominant_ratio}× the layer's median ` +
      `(the paper's Fig. 6(b)); near zero: below ${data.near_zero_ratio}×. The counts per checkpoint are in the Scalars dashboard.`));
    await this.img.decode().catch(() => {});
    if (seq === this.seq) this.el.setAttribute("aria-busy", "false");
  }

  /** The filters shown, large, in the zoom dialog. */
  zoom() {
    const { data } = this;
    if (!data) return;
    const img = h("img", { class: "cv-filter-mosaic cv-pixelated", alt: this.img.alt });
    zoomDialog({
      title: `First-layer filters · ${data.module} · step ${data.step}`, body: img,
      draw: (size) => showFilterMosaic(img, data.run, data.step, size),
    });
  }

  destroy() {
    this.slider.stop();
  }
}
