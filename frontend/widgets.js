// Pieces shared by the views: layer tabs, the checkpoint slider, image sizing, lazy images.

import { h, fill, formatValue } from "./dom.js";
import { currentSource, probeImageUrl } from "./api.js";
import { imageNoun } from "./source.js";
import { hasProjection } from "./show.js";

const PLAY_PAUSE_MS = 450;

export const layerTitle = (layer) => `Layer ${layer.index}`;

export function rfText(layer) {
  const [height, width] = layer.receptive_field?.size ?? [];
  return height == null ? "RF ?" : `RF ${height}×${width}`;
}

/** Tabs "Layer 1".."Layer N", each with its module name and receptive-field size. */
export function layerTabs(run, selected, onSelect) {
  return h(
    "div",
    { class: "cv-layer-tabs", role: "tablist", "aria-label": "Layers" },
    run.layers.map((layer) =>
      h(
        "button",
        {
          type: "button",
          role: "tab",
          class: "cv-layer-tab",
          "aria-selected": String(layer.name === selected),
          title: `${layer.name}: ${layer.units} units, top-${layer.k}, receptive field ${rfText(layer).slice(3)} px`,
          onclick: () => onSelect(layer.name),
        },
        h("span", { class: "cv-tab-title" }, layerTitle(layer)),
        h("span", { class: "cv-tab-sub" }, h("span", { class: "cv-tab-name" }, layer.name), ` · ${rfText(layer)}`),
      ),
    ),
  );
}

/**
 * A slider over checkpoint steps with a play button. `onChange(step)` returns a promise that
 * settles once the view shows that step, so playback waits for the images instead of racing.
 */
export class StepSlider {
  constructor({ onChange, label = "Checkpoint" }) {
    this.onChange = onChange;
    this.steps = [];
    this.playing = false;
    this.playButton = h("button", {
      type: "button", class: "cv-play", "aria-label": "Play through training", onclick: () => this.toggle(),
    }, "▶");
    this.input = h("input", {
      type: "range", min: 0, max: 0, step: 1, value: 0, "aria-label": label,
      oninput: () => this.onChange(this.steps[Number(this.input.value)]),
    });
    this.readout = h("output", { class: "cv-step-readout", "aria-live": "polite" });
    this.range = h("span", { class: "cv-step-range" });
    this.marks = h("div", { class: "cv-restart-marks" });
    this.el = h("div", { class: "cv-slider" }, this.playButton,
      h("div", { class: "cv-slider-track" }, this.input, this.marks, this.range), this.readout);
  }

  /** `restarts`: steps where a restarted training began logging into the run, marked on the track. */
  update(steps, step, restarts = []) {
    this.steps = steps;
    const index = Math.max(0, steps.indexOf(step));
    const last = Math.max(1, steps.length - 1);
    fill(this.marks, ...restarts.filter((s) => steps.includes(s)).map((s) => h("span", {
      class: "cv-restart-mark", style: { left: `${(100 * steps.indexOf(s)) / last}%` },
      title: `Training restarted: step ${s} is the first checkpoint of a new session`,
      // The mark lies over the track: a click on it goes where a click on the track there would.
      onclick: () => this.onChange(s),
    })));
    this.input.max = String(Math.max(0, steps.length - 1));
    this.input.value = String(index);
    this.input.disabled = steps.length < 2;
    this.playButton.disabled = steps.length < 2;
    const label = (s) => `step ${s}${restarts.includes(s) ? " · restart" : ""}`;
    this.readout.textContent = steps.length ? label(step) : "no checkpoints";
    // As wide as its longest label, so that the track keeps its width (and the marks their place) as the thumb moves.
    this.readout.style.minWidth = `${Math.max(9, ...steps.map((s) => label(s).length))}ch`;
    this.readout.title = `checkpoint ${index + 1} of ${steps.length}`;
    this.range.textContent = steps.length ? `${index + 1} / ${steps.length}` : "";
  }

  /** Move by `delta` checkpoints (arrow keys). */
  move(delta) {
    const index = Number(this.input.value) + delta;
    if (index < 0 || index >= this.steps.length) return Promise.resolve();
    return this.onChange(this.steps[index]);
  }

  toggle() {
    this.playing ? this.stop() : this.play();
  }

  stop() {
    this.playing = false;
    this.playButton.textContent = "▶";
    this.playButton.setAttribute("aria-label", "Play through training");
  }

  async play() {
    this.playing = true;
    this.playButton.textContent = "❚❚";
    this.playButton.setAttribute("aria-label", "Pause");
    if (Number(this.input.value) >= this.steps.length - 1) await this.onChange(this.steps[0]);
    while (this.playing && this.el.isConnected) {
      await new Promise((resolve) => setTimeout(resolve, PLAY_PAUSE_MS));
      if (!this.playing || Number(this.input.value) >= this.steps.length - 1) break;
      await this.move(1);
    }
    this.stop();
  }
}

/**
 * Display scale for an image of `natural` pixels in a box of `box` CSS pixels: small images
 * grow by a whole factor so every pixel stays a crisp square, never past the box; large ones
 * shrink to fit.
 */
export function fitScale(natural, box) {
  if (!natural) return 1;
  return natural >= box * 0.75 ? Math.min(1, box / natural) : Math.max(1, Math.floor(box / natural));
}

/** Size `img` for `box` once its real size is known, and mark it for pixelated upscaling. */
export function fitImage(img, box) {
  const apply = () => {
    const scale = fitScale(img.naturalWidth, box);
    img.style.width = `${Math.round(img.naturalWidth * scale)}px`;
    img.style.height = `${Math.round(img.naturalHeight * scale)}px`;
    img.classList.toggle("cv-pixelated", scale >= 2);
  };
  img.addEventListener("load", apply);
  if (img.complete && img.naturalWidth) apply();
  return img;
}

/**
 * Geometry of a mosaic drawn with `patch`-pixel patches (the API resamples every layer's
 * patches to that size, so deep layers are drawn as large as shallow ones): `ceil(sqrt(k))`
 * columns, 1-pixel separators.
 */
export function mosaicGeometry(layer, patch) {
  const cols = Math.ceil(Math.sqrt(layer.k));
  const rows = Math.ceil(layer.k / cols);
  // A patch's longer side is `patch`, as the API resamples it (non-square fields keep their shape).
  const [fh, fw] = layer.receptive_field?.size ?? [1, 1];
  const scale = patch / Math.max(fh, fw, 1);
  const ph = Math.max(1, Math.round(fh * scale));
  const pw = Math.max(1, Math.round(fw * scale));
  return { cols, rows, ph, pw, width: cols * pw + cols - 1, height: rows * ph + rows - 1 };
}

/** The largest patch size whose mosaic fits a `box`-pixel square. */
export function patchSizeFor(layer, box) {
  const cols = Math.ceil(Math.sqrt(layer.k));
  return Math.max(8, Math.min(512, Math.floor((box - (cols - 1)) / cols)));
}

/**
 * A mosaic image with one overlay cell per patch, exactly over it: each cell carries the
 * patch's tooltip (probe image, label, value), and `highlight` ranks are outlined.
 */
export class MosaicFigure {
  constructor(layer, patch, { alt = "" } = {}) {
    this.geometry = mosaicGeometry(layer, patch);
    const { cols, ph, pw, width, height } = this.geometry;
    this.img = h("img", { class: "cv-mosaic", alt, decoding: "async", width, height });
    this.cells = h("span", {
      class: "cv-mosaic-cells", "aria-hidden": "true",
      style: { "grid-template-columns": `repeat(${cols}, ${pw}px)`, "grid-auto-rows": `${ph}px` },
    });
    this.el = h("span", { class: "cv-mosaic-wrap", style: { width: `${width}px`, height: `${height}px` } },
      this.img, this.cells);
  }

  /** Tooltips for `records` (ranks missing from them leave an empty cell) and outlines for `highlight` ranks. */
  setRecords(records, { highlight = [], step, unit, source = undefined } = {}) {
    const byRank = new Map(records.map((r) => [r.rank, r]));
    const marked = new Set(highlight);
    const cells = [];
    for (let rank = 0; rank < this.geometry.cols * this.geometry.rows; rank++) {
      const record = byRank.get(rank);
      cells.push(h("span", {
        class: marked.has(rank) ? "cv-cell cv-shared" : "cv-cell",
        title: record ? recordTip(record, step, unit, source) : null,
      }));
    }
    fill(this.cells, cells);
  }
}

const capitalized = (text) => text[0].toUpperCase() + text.slice(1);

/** One line per fact a researcher asks of a patch (`source`: whose image it is, by default the view's). */
export function recordTip(record, step, unit, source = currentSource()) {
  const label = labelText(record);
  return [`Rank ${record.rank + 1} · activation ${formatValue(record.value)}`,
    `${capitalized(imageNoun(source))} #${record.image}${label == null ? "" : ` · label ${label}`}`,
    unit == null ? null : `Unit ${unit} · step ${step}`].filter(Boolean).join("\n");
}

/**
 * Start a grid of mosaic tiles for `layer`: a fresh ImageFeed (lazy from LAZY_UNITS units on,
 * so large layers stay responsive) and the tile size of a mosaic of `patch`-pixel patches.
 */
export function startMosaicGrid(view, layer, layerKey, patch) {
  view.feed?.disconnect();
  view.feed = new ImageFeed({ lazy: layer.units >= LAZY_UNITS });
  view.layerKey = layerKey;
  view.tiles.clear();
  const { width, height } = mosaicGeometry(layer, patch);
  view.grid.style.setProperty("--tile", `${width}px`);
  view.grid.style.setProperty("--tile-h", `${height}px`);
}

// Patch sizes a user can pick for the layer grid, and the default.
export const PATCH_SIZES = [32, 48, 64, 96];
export const DEFAULT_PATCH = 48;
// Units that keep fewer than half of their top-k images count as changed.
export const CHANGED_BELOW = 0.5;

// From this many units on, mosaics load only near the viewport so the page stays responsive.
const LAZY_UNITS = 512;

const nextFrame = () => new Promise((resolve) => requestAnimationFrame(resolve));

/**
 * Gives images their source, either at once or (`lazy`) when they come near the viewport;
 * `settle()` resolves once every image given a source so far has decoded or failed.
 */
export class ImageFeed {
  constructor({ lazy }) {
    this.pending = [];
    // What to draw for an image once it comes near the viewport (lazy feeds only).
    this.updates = new Map();
    this.observer = lazy ? new IntersectionObserver((entries) => this.reveal(entries), { rootMargin: "400px" }) : null;
  }

  assign(img, src) {
    img.dataset.src = src;
    if (this.isNear(img)) this.load(img);
    else this.observe(img);
  }

  /** Run `update` now if `img` is near the viewport (or the feed is not lazy), else once it comes near. */
  whenNear(img, update) {
    if (this.isNear(img)) {
      this.updates.delete(img);
      update();
    } else {
      this.updates.set(img, update);
      this.observe(img);
    }
  }

  /** Whether `img` is near the viewport; every image is when the feed is not lazy. */
  isNear(img) {
    return !this.observer || img.hasAttribute("data-near");
  }

  /** Watch `imgs` for the viewport from now on (lazy feeds), before anything is assigned to them. */
  watch(imgs) {
    if (this.observer) imgs.forEach((img) => this.observe(img));
  }

  observe(img) {
    if (img.dataset.observed) return;
    img.dataset.observed = "1";
    this.observer.observe(img);
  }

  reveal(entries) {
    for (const entry of entries) {
      const img = entry.target;
      img.toggleAttribute("data-near", entry.isIntersecting);
      if (!entry.isIntersecting) continue;
      const update = this.updates.get(img);
      this.updates.delete(img);
      update?.();
      if (img.dataset.src) this.load(img);
    }
  }

  load(img) {
    if (img.getAttribute("src") === img.dataset.src) return;
    img.src = img.dataset.src;
    this.pending.push(img.decode().catch(() => {}));
  }

  async settle() {
    if (this.observer) {
      // Intersections of newly observed images are computed during the next rendering.
      await nextFrame();
      await nextFrame();
      this.reveal(this.observer.takeRecords());
    }
    const pending = this.pending;
    this.pending = [];
    await Promise.all(pending);
  }

  disconnect() {
    this.observer?.disconnect();
  }
}

/** A record's class: its name, else its integer label (a probe set logged without class names); null without one. */
export function labelText(record) {
  return record.label_name ?? (record.label != null ? `class ${record.label}` : null);
}

/** Alt text naming unit, rank, value and label of each record shown. */
export function recordsAlt(unit, step, records) {
  const parts = records.map((r) =>
    `${r.rank + 1}: ${formatValue(r.value)}${labelText(r) != null ? ` ${labelText(r)}` : ""}`);
  return `Unit ${unit} at step ${step}, top ${records.length} patches (rank: activation label) ${parts.join(", ")}`;
}

export function recordAlt(unit, step, record, source = currentSource()) {
  const label = labelText(record) != null ? `, label ${labelText(record)}` : "";
  return `Unit ${unit}, rank ${record.rank + 1}, activation ${formatValue(record.value)}${label}, step ${step}, ${imageNoun(source)} ${record.image}`;
}

/** Open a modal dialog titled `title` with `body` nodes; it removes itself when closed. */
export function openDialog({ title, label = title, tools = null, className = "" }, ...body) {
  const dialog = h(
    "dialog",
    { class: `cv-dialog ${className}`.trim(), "aria-label": label },
    h("div", { class: "cv-dialog-head" },
      h("strong", {}, title),
      h("span", { class: "cv-spacer" }),
      tools,
      h("button", { type: "button", class: "cv-close", "aria-label": "Close", onclick: () => dialog.close() }, "✕")),
    body,
  );
  dialog.addEventListener("close", () => dialog.remove());
  dialog.addEventListener("click", (e) => { if (e.target === dialog) dialog.close(); });
  document.body.append(dialog);
  dialog.showModal();
  return dialog;
}

/** Close every open dialog: they belong to the view an address change replaces. */
export function closeDialogs() {
  for (const dialog of document.querySelectorAll("dialog.cv-dialog[open]")) dialog.close();
}

/** A modal with the whole probe image and the record's receptive-field box (`source`: as for showZoom). */
export function showProbeImage({ run, layer, step, unit, record, source = undefined }) {
  const whose = source ?? currentSource();
  const noun = imageNoun(whose);
  const img = fitImage(h("img", {
    class: "cv-probe-image",
    src: probeImageUrl(run, layer.name, step, unit, record.rank, record.image, null, source),
    alt: `${capitalized(noun)} ${record.image} with the receptive fields of ${recordAlt(unit, step, record, whose)}`,
  }), 320);
  const overlay = hasProjection(layer, step, record.rank) ? firesToggle((on) => {
    img.src = probeImageUrl(run, layer.name, step, unit, record.rank, record.image, on ? "projection" : null, source);
  }) : null;
  const failure = h("p", { class: "cv-dim", hidden: true });
  img.addEventListener("error", () => {
    failure.hidden = false;
    failure.textContent = `The ${noun} could not be loaded (see the TensorBoard log).`;
  });
  return openDialog({ title: `${capitalized(noun)} #${record.image}`, tools: overlay },
    h("div", { class: "cv-dialog-body" }, img, failure),
    h("p", { class: "cv-caption" }, "Red: the unit's theoretical receptive field. Blue: the effective field the patch " +
      "shows (where it differs)." + (overlay ? " Where it fires: in colour where the record's projection is strong, dark grey elsewhere." : "")),
    h("dl", { class: "cv-facts" },
      fact("Unit", `${unit} · ${layerTitle(layer)} (${layer.name})`),
      fact("Rank", `${record.rank + 1} of ${layer.k}`),
      fact("Activation", formatValue(record.value)),
      fact("Label", labelText(record) ?? "–"),
      fact("Position", record.y == null ? "whole image" : `feature map (${record.y}, ${record.x})`),
      fact("Step", String(step))));
}

/** The "Where it fires" checkbox: `onChange(on)` swaps in the image spotlit by the record's projection. */
export function firesToggle(onChange) {
  const box = h("input", { type: "checkbox", class: "cv-fires", onchange: () => onChange(box.checked) });
  return h("label", { class: "cv-field", title: "The image in colour where the record's projection is strong (where the " +
    "unit's activation comes from), dark grey elsewhere" }, box, "Where it fires");
}

function fact(term, value) {
  return [h("dt", {}, term), h("dd", {}, value)];
}

/** `step` if `steps` has it, else the nearest of `steps` (the later on a tie), else undefined. */
export function nearestStep(steps, step) {
  if (!steps.length) return undefined;
  if (!Number.isFinite(step)) return steps.at(-1);
  return steps.reduce((best, s) => (Math.abs(s - step) <= Math.abs(best - step) ? s : best));
}
