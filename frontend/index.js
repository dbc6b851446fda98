// ConvViz dashboard entry point: TensorBoard's plugin_entry.html imports this module and
// calls render(). The App owns the state (mirrored in the URL hash), the runs list (polled
// for live runs) and the current view.

import { h, fill, select, message } from "./dom.js";
import { getJson, setLimits } from "./api.js";
import { readState, writeState, rememberState, forgetState, shareUrl } from "./state.js";
import { GridView, SORTS } from "./grid.js";
import { StabilityView, AGAINST } from "./stability.js";
import { UnitView } from "./unit.js";
import { CompareView, ORDERS, matching } from "./compare.js";
import { EvolutionGridView, ROW_ORDERS } from "./evolution_grid.js";
import { SHOWS } from "./show.js";
import { PATCH_SIZES, DEFAULT_PATCH, nearestStep, openDialog, closeDialogs } from "./widgets.js";
import { followTensorBoardTheme } from "./theme.js";
import { applyField, fieldBar } from "./field.js";
import { showHelp } from "./help.js";
import { sourceSwitch, useSource, validBeside, validSource } from "./source.js";

const POLL_MS = 12000;
const VIEWS = { grid: GridView, stability: StabilityView, unit: UnitView, compare: CompareView, evolution: EvolutionGridView };
const NAV = [["grid", "Layers"], ["evolution", "Fig. 4 grid"], ["stability", "Stability"], ["compare", "Compare"]];
const GRID_ROWS = [8, 16, 32];

function emptyState() {
  return message("info", "No ConvViz data in this log directory yet.",
    h("span", {}, "1. Pick fixed probe images, as fed to the model: ",
      h("code", {}, "probe = ProbeSet.from_dataset(val_set, n=1024, seed=0, mean=MEAN, std=STD)"),
      " (MEAN and STD: your Normalize transform's, so that the patches show the images as they look)"),
    h("span", {}, "2. Next to your SummaryWriter: ", h("code", {}, "cv = ConvVizLogger(model, probe, log_dir=writer.log_dir)")),
    h("span", {}, "3. In the training loop call ", h("code", {}, "cv.maybe_log(step)"),
      ", and point TensorBoard at the same directory. To see it work first, run ", h("code", {}, "tb-convviz demo"), "."));
}

class App {
  constructor(root) {
    this.root = root;
    this.runs = [];
    this.loaded = false;
    this.state = {};
    this.view = null;
    this.viewName = null;
    this.pollTimer = null;
    this.runSlot = h("div", { class: "cv-run-slot" });
    this.sourceSlot = h("div", { class: "cv-source-slot" });
    this.nav = h("nav", { class: "cv-nav", "aria-label": "Views" });
    this.live = h("span", { class: "cv-live", "aria-live": "polite" });
    this.copyButton = h("button", {
      type: "button", class: "cv-button cv-copy-link", title: "Copy an address that opens this exact view",
      onclick: () => this.copyLink(),
    }, "Copy link");
    const helpButton = h("button", {
      type: "button", class: "cv-button cv-help-button", title: "Keyboard shortcuts (?)", "aria-label": "Keyboard shortcuts",
      onclick: () => showHelp(),
    }, "?");
    this.banner = h("div", { class: "cv-banner" });
    this.main = h("main", { class: "cv-main" });
    fill(root,
      h("header", { class: "cv-header" },
        h("span", { class: "cv-brand" }, "ConvViz"), this.runSlot, this.sourceSlot, this.nav, h("span", { class: "cv-spacer" }), this.live,
        this.copyButton, helpButton),
      this.banner, this.main);
  }

  get run() {
    return this.runs.find((r) => r.run === this.state.run);
  }

  get layer() {
    return this.run?.layers.find((l) => l.name === this.state.layer);
  }

  async start() {
    // A pasted link, Back/Forward or a new "#": the dialogs of the old view must not stay over the new one.
    window.addEventListener("hashchange", () => {
      closeDialogs();
      this.navigate(readState(), { replace: true });
    });
    document.addEventListener("keydown", (e) => this.onKey(e));
    fill(this.main, h("p", { class: "cv-dim cv-loading" }, "Loading runs…"));
    await this.refresh();
    this.schedulePoll();
  }

  /** Valid state closest to `wanted`: unknown runs, layers, steps and units fall back to defaults. */
  normalize(wanted) {
    const state = { ...wanted };
    const run = this.runs.find((r) => r.run === state.run) ?? this.runs[0];
    state.run = run.run;
    state.source = validSource(run, state.source);
    const layer = run.layers.find((l) => l.name === state.layer) ?? run.layers[0];
    state.layer = layer?.name;
    const steps = layer?.steps ?? [];
    // An unknown step (another run's, or gone) becomes the nearest one this layer has.
    if (!steps.includes(state.step)) state.step = nearestStep(steps, state.step);
    // Own keys only: a link's "toString" or "__proto__" must not pass for a view.
    if (typeof state.view !== "string" || !Object.hasOwn(VIEWS, state.view)) state.view = "grid";
    if (!SORTS.some(([key]) => key === state.sort)) state.sort = "unit";
    if (!PATCH_SIZES.includes(state.patch) || state.patch === DEFAULT_PATCH) delete state.patch;
    if (typeof state.filter !== "string" || !/^(dead|changed|class:-?[0-9]{1,9})$/.test(state.filter)) delete state.filter;
    if (state.view === "unit" && !(Number.isInteger(state.unit) && state.unit >= 0 && state.unit < (layer?.units ?? 0))) {
      state.view = "grid";
    }
    if (state.view !== "unit") delete state.unit;
    if (state.view !== "unit" || !validBeside(run, state.source, state.beside)) delete state.beside;
    // Patches are the default, left out of the URL like the other defaults.
    if (state.show === "patch" || !SHOWS.some(([key]) => key === state.show)) delete state.show;
    if (state.view === "evolution") {
      if (!ROW_ORDERS.some(([key]) => key === state.rows)) state.rows = "changed";
      if (!GRID_ROWS.includes(state.count)) state.count = 16;
      if (state.rows !== "random") delete state.seed;
      else if (!(Number.isInteger(state.seed) && state.seed >= 0)) state.seed = 0;
      if (state.rows !== "units" || !/^[0-9]{1,6}(,[0-9]{1,6}){0,255}$/.test(state.units ?? "")) {
        if (state.rows === "units") state.units = "0";
        else delete state.units;
      }
      if (state.cols != null && !/^(all|[0-9]{1,3}|-?[0-9]{1,18}(,-?[0-9]{1,18}){1,127},?)$/.test(state.cols)) delete state.cols;
    } else {
      for (const key of ["rows", "count", "seed", "units", "cols"]) delete state[key];
    }
    if (state.view !== "grid" || layer?.index !== 1 || !run.filters || state.filters !== "1") {
      delete state.filters;
      delete state.filter_step;
    }
    if (state.view === "compare") {
      if (!ORDERS.some(([key]) => key === state.order)) state.order = "change";
      // A is the run and step the other views show; B is `b_run` at `b_step`.
      const other = this.runs.find((r) => r.run === state.b_run) ?? run;
      state.b_run = other.run;
      const otherSteps = other.layers.find((l) => l.name === state.layer)?.steps ?? [];
      if (!otherSteps.includes(state.b_step)) {
        // By default: the previous checkpoint (what changed to get here), or the same step of the other run.
        const i = steps.indexOf(state.step);
        const reference = Number.isInteger(state.b_step) ? state.b_step
          : other === run ? steps[i > 0 ? i - 1 : Math.min(1, steps.length - 1)] : state.step;
        state.b_step = nearestStep(otherSteps, reference);
      }
      if (state.match !== "0" && state.match !== "1") delete state.match;
      // Only a choice that differs from the default (matched across runs, not within one) is kept.
      if (state.match && matching({ ...state, match: undefined }, layer) === (state.match === "1")) delete state.match;
    } else {
      delete state.b_run;
      delete state.b_step;
      delete state.order;
      delete state.match;
    }
    if (state.view !== "stability" || !AGAINST.some(([key]) => key === state.against) || state.against === AGAINST[0][0]) {
      delete state.against;
    }
    return state;
  }

  /** Merge `patch` into the state (or replace it), show it, and resolve once the view shows it. */
  navigate(patch, { replace = false } = {}) {
    if (!this.loaded) return Promise.resolve();
    if (!this.runs.length) {
      this.showView(null);
      fill(this.main, emptyState());
      return Promise.resolve();
    }
    const wanted = replace ? patch : { ...this.state, ...patch };
    for (const key of Object.keys(wanted)) if (wanted[key] == null) delete wanted[key];
    let shown;
    try {
      shown = Promise.resolve(this.show(wanted));
    } catch (e) {
      shown = Promise.reject(e);
    }
    // Only a state that rendered is remembered; one that failed is forgotten, and the
    // tab starts over from the default view instead of failing on every later visit.
    return shown.then(() => rememberState(this.state), (e) => this.recover(e, wanted));
  }

  show(wanted) {
    const source = this.state.source;
    this.state = this.normalize(wanted);
    useSource(this.state);
    if (source !== this.state.source) this.showView(null);  // a view's data are the old source's
    // Other crops: every image of the view changes, so it is built afresh.
    if (applyField(this.state)) this.viewName = null;
    writeState(this.state);
    this.renderChrome();
    if (!this.layer) {
      this.showView(null);
      fill(this.main, message("info", `Run ${this.state.run} has no layers yet`,
        "Its first checkpoint has not been written, or it could not be read (see the message above)."));
      return undefined;
    }
    this.showView(this.state.view);
    return this.view.update();
  }

  recover(error, wanted) {
    forgetState();
    console.warn("ConvViz: this view could not be shown; starting over from the default view", wanted, error);
    if (this.recovering || Object.keys(wanted).length === 0) {
      this.showView(null);
      fill(this.main, message("error", "Could not show this view", error?.message ?? String(error)));
      return undefined;
    }
    this.recovering = true;
    this.viewName = null;
    this.view = null;
    return this.navigate({}, { replace: true }).finally(() => { this.recovering = false; });
  }

  showView(name) {
    if (name === this.viewName) return;
    this.view?.destroy();
    this.viewName = name;
    this.view = name ? new VIEWS[name](this) : null;
    fill(this.main, this.view?.el);
  }

  renderChrome() {
    const run = this.run;
    fill(this.runSlot, h("label", { class: "cv-field" }, "Run",
      // First-strong isolates keep a right-to-left name from reordering " (read errors)".
      select(this.runs.map((r) => [r.run, r.error ? `\u2068${r.run}\u2069 (read errors)` : r.run]), run.run,
        (value) => this.navigate({ run: value }), { class: "cv-run-select", "aria-label": "Run" })));
    fill(this.sourceSlot, sourceSwitch(run, this.state.source, (value) => this.navigate({ source: value })));
    const current = this.state.view === "unit" ? "grid" : this.state.view;
    fill(this.nav, ...NAV.map(([name, label]) => h("button", {
      type: "button", class: "cv-nav-item", "aria-current": name === current ? "page" : null,
      onclick: () => this.navigate({ view: name }),
    }, label)));
    fill(this.banner, run.error && message("error", `Some ConvViz data of run ${run.run} could not be read`, run.error),
      fieldBar(this));
  }

  onKey(event) {
    const target = event.target;
    if (event.defaultPrevented || event.altKey || event.ctrlKey || event.metaKey) return;
    if (target.closest?.("input, select, textarea, dialog") || document.querySelector("dialog[open]")) return;
    if (event.key === "?") {
      showHelp();
    } else if (/^[1-9]$/.test(event.key) && this.run?.layers[Number(event.key) - 1]) {
      const layer = this.run.layers[Number(event.key) - 1].name;
      this.navigate({ layer, view: this.state.view === "stability" ? "grid" : this.state.view });
    } else if (!this.view?.onKey?.(event)) {
      return;
    }
    event.preventDefault();
  }

  /** Copy an address that restores this view in a fresh browser; show it when the clipboard refuses. */
  async copyLink() {
    const link = shareUrl(this.state);
    this.copyButton.dataset.link = link;
    try {
      await navigator.clipboard.writeText(link);
      this.live.textContent = "Link copied";
    } catch {
      const field = h("input", { type: "text", class: "cv-link-field", readonly: true, value: link, "aria-label": "Link to this view" });
      openDialog({ title: "Link to this view" }, h("p", { class: "cv-caption" }, "Copy this address; it opens this exact view:"), field);
      field.select();
    }
  }

  schedulePoll() {
    clearTimeout(this.pollTimer);
    this.pollTimer = setTimeout(() => this.poll(), POLL_MS);
  }

  /** Pick up new runs and checkpoints of runs still training, without a reload. */
  async poll() {
    try {
      if (document.visibilityState !== "hidden") await this.refresh();
    } finally {
      this.schedulePoll();
    }
  }

  /** Fetch the runs; show them at once the first time, and later only what changed. */
  async refresh() {
    let runs;
    try {
      const body = await getJson("runs");
      setLimits(body.limits);
      runs = body.runs;
    } catch (e) {
      if (this.loaded) {
        this.live.textContent = "Connection lost, retrying…";
        this.live.title = e.message;
      } else {
        fill(this.main, message("error", "Could not list the ConvViz runs", e.message, "Retrying shortly."));
      }
      return;
    }
    this.live.textContent = "";
    this.live.title = "";
    const first = !this.loaded;
    if (!first && JSON.stringify(runs) === JSON.stringify(this.runs)) return;
    this.loaded = true;
    const before = this.layer?.steps ?? [];
    const wasLatest = this.state.step === before.at(-1);
    this.runs = runs;
    const after = this.layer?.steps ?? [];
    if (after.length > before.length && before.length) {
      this.live.textContent = `New checkpoint: step ${after.at(-1)}`;
    }
    if (first) return this.navigate(readState(), { replace: true });
    // A user watching the latest checkpoint keeps watching the latest one.
    return this.navigate(wasLatest && this.state.view !== "compare" ? { step: after.at(-1) } : {});
  }
}

function loadStylesheet() {
  const href = new URL("./style.css", import.meta.url).href;
  if ([...document.styleSheets].some((s) => s.href === href)) return;
  document.head.append(h("link", { rel: "stylesheet", href }));
}

/** Called by TensorBoard's plugin_entry.html inside the ConvViz iframe. */
export function render() {
  loadStylesheet();
  followTensorBoardTheme();
  document.documentElement.lang ||= "en";
  document.title = "ConvViz";
  const app = new App(document.body);
  app.start();
  return app;
}
