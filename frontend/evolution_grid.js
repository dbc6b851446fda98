// The Fig. 4 grid (Zeiler & Fergus): rows are units, columns checkpoints, each cell the unit's top-1
// projection (or patch) there. One request per row: the server draws the whole row as one image.

import { h, fill, select, message } from "./dom.js";
import { getJson } from "./api.js";
import { layerTabs, layerTitle, rfText } from "./widgets.js";
import { rowUrl, effectiveShow, showToggle, NOT_LOGGED } from "./show.js";

const CELL_PX = 48;
const MAX_COLUMNS = 128;  // the server's bound on cells per row
export const ROW_ORDERS = [["changed", "Units that changed most"], ["random", "Random sample"], ["units", "Units I pick"]];
const COLUMN_CHOICES = [["all", "Every checkpoint"], ["8", "8 columns, like the paper"], ["16", "16 columns"]];
const COUNTS = [[8, "8 rows"], [16, "16 rows"], [32, "32 rows"]];

/** `count` of `steps`, evenly spaced by index, always keeping the first and the last. */
export function thinSteps(steps, count) {
  if (steps.length <= count) return [...steps];
  const picked = new Set();
  for (let i = 0; i < count; i++) picked.add(steps[Math.round((i * (steps.length - 1)) / (count - 1))]);
  return [...picked];
}

/** The columns the `cols` state names: "all", a count, or an explicit comma-separated list of steps. */
export function columnSteps(steps, cols) {
  if (cols && cols.includes(",")) return cols.split(",").map(Number).filter((s) => steps.includes(s));
  const count = Number(cols);
  return thinSteps(steps, Number.isInteger(count) && count >= 2 ? Math.min(count, MAX_COLUMNS) : MAX_COLUMNS);
}

export class EvolutionGridView {
  constructor(app) {
    this.app = app;
    this.seq = 0;
    this.tabs = h("div", { class: "cv-tabs-slot" });
    this.controls = h("div", { class: "cv-toolbar cv-fig4-controls" });
    this.summary = h("p", { class: "cv-summary" });
    this.notice = h("div", { class: "cv-notice" });
    this.grid = h("div", { class: "cv-fig4", "aria-busy": "true", "aria-label": "Units over training" });
    this.el = h("section", { class: "cv-view cv-fig4-view" }, this.tabs, this.controls, this.summary, this.notice, this.grid);
  }

  destroy() {}

  async update() {
    const { state, run, layer } = this.app;
    fill(this.tabs, layerTabs(run, layer.name, (name) => this.app.navigate({ layer: name })));
    this.renderControls(layer, state);
    const seq = ++this.seq;
    this.grid.setAttribute("aria-busy", "true");
    const steps = columnSteps(layer.steps, state.cols);
    let data;
    try {
      data = await getJson("fig4", {
        run: run.run, layer: layer.name, rows: state.rows, count: state.count, seed: state.seed,
        units: state.rows === "units" ? state.units : null, steps: steps.join(","),
      }, { cached: true });
    } catch (e) {
      if (seq === this.seq) {
        fill(this.notice, message("error", "Could not build the grid", e.message));
        fill(this.grid);
        this.grid.setAttribute("aria-busy", "false");
      }
      return;
    }
    if (seq !== this.seq) return;
    fill(this.notice, !layer.projections && (state.show ?? "patch") !== "patch"
      ? message("info", `Projections: ${NOT_LOGGED}`, "The cells show the top-1 patches instead.") : null);
    await this.showRows(run, layer, data, effectiveShow(state.show, layer));
    if (seq === this.seq) this.grid.setAttribute("aria-busy", "false");
  }

  renderControls(layer, state) {
    const nav = (patch) => this.app.navigate(patch);
    const unitsInput = h("input", {
      type: "text", class: "cv-units-input", value: state.units ?? "", placeholder: "e.g. 0,3,7",
      "aria-label": "Units to show", disabled: state.rows !== "units",
      onchange: (e) => nav({ units: e.target.value.replace(/\s+/g, "") || null }),
    });
    const stepsInput = h("input", {
      type: "text", class: "cv-steps-input", placeholder: "or steps, e.g. 0,10,50",
      value: state.cols?.includes(",") ? state.cols : "", "aria-label": "Checkpoint steps to show",
      onchange: (e) => nav({ cols: e.target.value.replace(/\s+/g, "") || null }),
    });
    fill(this.controls,
      showToggle(layer, state.show, (show) => nav({ show })),
      h("label", { class: "cv-field" }, "Rows", select(ROW_ORDERS, state.rows, (rows) => nav({ rows }), { "aria-label": "Rows" })),
      state.rows === "units" ? unitsInput
        : h("label", { class: "cv-field" }, "Count", select(COUNTS, state.count, (count) => nav({ count: Number(count) }), { "aria-label": "Row count" })),
      state.rows === "random" ? h("label", { class: "cv-field" }, "Seed", h("input", {
        type: "number", min: 0, value: state.seed ?? 0, class: "cv-seed-input", "aria-label": "Random seed",
        onchange: (e) => nav({ seed: Math.max(0, Math.floor(Number(e.target.value) || 0)) }),
      })) : null,
      h("label", { class: "cv-field" }, "Columns",
        select(COLUMN_CHOICES, COLUMN_CHOICES.some(([v]) => v === state.cols) ? state.cols : "all",
          (cols) => nav({ cols }), { "aria-label": "Columns" })),
      stepsInput);
  }

  async showRows(run, layer, data, show) {
    const kinds = show === "both" ? ["patch", "projection"] : [show];
    const cell = CELL_PX + 1;
    const header = h("div", { class: "cv-fig4-row cv-fig4-header" },
      h("span", { class: "cv-fig4-label" }, ""),
      h("span", { class: "cv-fig4-steps" }, data.steps.map((s) => h("span", {
        class: "cv-fig4-step", style: { width: `${cell}px` },
        title: data.projection_steps.includes(s) ? `step ${s}` : `step ${s}: no projections logged`,
      }, String(s)))));
    const pending = [];
    const rows = data.units.map((u) => h("div", { class: "cv-fig4-unit", dataset: { unit: String(u.unit) } },
      kinds.map((kind) => {
        const img = h("img", {
          class: "cv-fig4-img", decoding: "async", dataset: { kind },
          alt: `Unit ${u.unit}: top-1 ${kind} at steps ${data.steps.join(", ")}`,
          title: `Unit ${u.unit}: click a cell to open the unit at that checkpoint`,
        });
        img.addEventListener("click", (e) => {
          const column = Math.min(data.steps.length - 1, Math.floor((e.offsetX * (img.naturalWidth / img.clientWidth)) / cell));
          this.app.navigate({ view: "unit", unit: u.unit, step: data.steps[Math.max(0, column)] });
        });
        img.src = rowUrl(run.run, layer.name, u.unit, data.steps, kind, CELL_PX);
        pending.push(img.decode().catch(() => img.classList.add("cv-broken")));
        return h("div", { class: "cv-fig4-row" },
          h("span", { class: "cv-fig4-label" }, `#${u.unit}`, kinds.length > 1 ? h("span", { class: "cv-dim" }, ` ${kind}`) : null,
            h("span", { class: "cv-dim cv-fig4-changes", title: "times its top-1 image changed across these columns" }, ` ${u.changes}×`)),
          img);
      })));
    fill(this.grid, header, rows);
    fill(this.summary, `${layerTitle(layer)} · ${rfText(layer)} · ${data.units.length} units × ${data.steps.length} checkpoints · `,
      `top-1 ${show === "both" ? "patch and projection" : show} per cell`,
      layer.projections ? ` · ${layer.projections.rule}` : "");
    await Promise.all(pending);
  }
}
