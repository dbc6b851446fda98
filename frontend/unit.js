// Unit view (Zeiler & Fergus Fig. 4): one unit's top patches at every checkpoint.

import { h, fill, message, formatValue, formatPercent } from "./dom.js";
import { currentSource, getJson, mosaicUrl, patchUrl, topk } from "./api.js";
import { ImageFeed, MosaicFigure, mosaicGeometry, patchSizeFor, labelText, layerTitle, rfText, recordAlt, recordsAlt, showProbeImage } from "./widgets.js";
import { unitJump, passes } from "./finder.js";
import { sortUnits, notFiniteChip } from "./grid.js";
import { showZoom } from "./zoom.js";
import { assignProjection, effectiveShow, hasProjection, projectionUrl, showToggle } from "./show.js";
import { besideSwitch, imageNoun, sourceName } from "./source.js";

const PATCH_PX = 64;
// The current checkpoint's mosaic is drawn to fill this square exactly, whatever the layer.
const MOSAIC_PX = 224;
const LAZY_PATCHES = 256;

/** Counts of class labels among records, most frequent first; null when nothing has a label. */
function labelCounts(records) {
  const counts = new Map();
  for (const label of records.map(labelText)) if (label != null) counts.set(label, (counts.get(label) ?? 0) + 1);
  return counts.size ? [...counts].sort((a, b) => b[1] - a[1] || String(a[0]).localeCompare(String(b[0]))) : null;
}

/** Scroll the strip sideways so its selected checkpoint is in the middle (the page itself does not move). */
function centerSelected(strip) {
  const column = strip?.querySelector(".cv-evo-col.cv-selected");
  if (!column) return;
  const [s, c] = [strip.getBoundingClientRect(), column.getBoundingClientRect()];
  strip.scrollLeft += c.left - s.left - (strip.clientWidth - c.width) / 2;
}

export class UnitView {
  constructor(app) {
    this.app = app;
    this.seq = 0;
    this.evolutionKey = null;
    this.evolutions = new Map();  // source -> its pending `evolution` answer for `evolutionKey`
    this.feed = null;
    this.head = h("div", { class: "cv-unit-head" });
    this.body = h("div", { class: "cv-unit-body", "aria-busy": "true" });
    this.el = h("section", { class: "cv-view cv-unit-view" }, this.head, this.body);
  }

  destroy() {
    this.feed?.disconnect();
  }

  onKey(event) {
    const { layer, state } = this.app;
    if (event.key === "Escape") {
      this.app.navigate({ view: "grid" });
      return true;
    }
    if (event.key === "z") {
      this.zoom(this.current);
      return true;
    }
    if (event.key === "g") {
      this.head.querySelector(".cv-unit-jump")?.focus();
      return true;
    }
    const unitDelta = { ArrowUp: -1, ArrowDown: 1 }[event.key];
    if (unitDelta) {
      this.moveUnit(unitDelta);
      return true;
    }
    const delta = { ArrowLeft: -1, ArrowRight: 1 }[event.key];
    const next = layer.steps[layer.steps.indexOf(state.step) + (delta ?? 0)];
    if (!delta || next == null) return false;
    this.app.navigate({ step: next });
    return true;
  }

  /** The unit's checkpoints from `source` ("probe", "train", "eval"), fetched once per unit and step count. */
  evolutionOf(run, layer, unit, source) {
    // The step count is part of the key so that a live run's new checkpoints are fetched.
    const key = JSON.stringify([run.run, layer.name, unit, layer.steps.length]);
    if (key !== this.evolutionKey) {
      this.evolutionKey = key;
      this.evolutions.clear();
    }
    if (!this.evolutions.has(source)) {
      const pending = getJson("evolution", { run: run.run, layer: layer.name, unit, source });
      pending.catch(() => this.evolutions.get(source) === pending && this.evolutions.delete(source));
      this.evolutions.set(source, pending);
    }
    return this.evolutions.get(source);
  }

  async update() {
    const { run, layer, state } = this.app;
    const unit = state.unit;
    this.renderHead(run, layer, unit);
    const seq = ++this.seq;
    this.body.setAttribute("aria-busy", "true");
    const source = state.source ?? "probe";
    // A failure of the source beside is shown in its panel; the view's own source still shows.
    const beside = state.beside && this.evolutionOf(run, layer, unit, state.beside).catch((e) => e);
    let evolution;
    try {
      evolution = await this.evolutionOf(run, layer, unit, source);
    } catch (e) {
      if (seq === this.seq) fill(this.body, message("error", `Could not load unit ${unit}`, e.message));
      return;
    }
    const other = await beside;
    if (seq !== this.seq) return;
    const current = evolution.checkpoints.find((c) => c.step === state.step) ?? evolution.checkpoints.at(-1);
    this.current = current;
    this.feed?.disconnect();
    // Expanded, a long run has thousands of patches: then they load as they scroll into view.
    const expanded = state.expand === "1";
    this.feed = new ImageFeed({ lazy: evolution.checkpoints.length * (expanded ? layer.k : 1) > LAZY_PATCHES });
    const besidePanel = other && { source: state.beside, evolution: other };
    fill(this.body,
      h("div", { class: "cv-cards" }, this.renderCurrent(run, layer, unit, current, besidePanel), this.renderLabels(layer, current, source)),
      this.renderStrip(run, layer, unit, evolution.checkpoints, current, expanded),
    );
    centerSelected(this.body.querySelector(".cv-evo-strip"));
    await this.feed.settle();
    if (seq === this.seq) this.body.setAttribute("aria-busy", "false");
  }

  /** An image whose box has its final `width` x `height` before it loads, so the layout never shifts. */
  image(src, alt, { width, height }, cls = null) {
    const img = h("img", { class: cls, alt, decoding: "async", width, height });
    this.feed.assign(img, src);
    return img;
  }

  /** Open a checkpoint's top-k large (`source`: whose records, when not the view's). */
  zoom(checkpoint, source = undefined) {
    const { run, layer, state } = this.app;
    if (checkpoint) showZoom({ run: run.run, layer, step: checkpoint.step, unit: state.unit, records: checkpoint.records, source });
  }

  /** Go `delta` units on in the grid's order: its sort, and only the units its filter shows. */
  async moveUnit(delta) {
    const { run, layer, state } = this.app;
    let order = [...Array(layer.units).keys()];
    if (state.filter || state.sort !== "unit") {
      try {
        const data = await topk(run.run, layer.name, state.step);
        order = sortUnits(data.units, state.sort).filter((u) => passes(u, state.filter)).map((u) => u.unit);
      } catch {
        // without the layer's data, plain unit order still works
      }
    }
    const i = order.indexOf(state.unit);
    const next = i < 0 ? order.at(delta > 0 ? 0 : -1) : order[i + delta];
    if (next != null && next !== state.unit) return this.app.navigate({ unit: next });
  }

  renderHead(run, layer, unit) {
    const { state } = this.app;
    const ordered = Boolean(state.filter) || state.sort !== "unit";
    const order = ordered ? ` in the grid's order${state.filter ? ` (shown: ${state.filter})` : ""}` : "";
    const go = (delta) => this.moveUnit(delta);
    fill(this.head,
      h("button", { type: "button", class: "cv-back", onclick: () => this.app.navigate({ view: "grid" }) },
        `← ${layerTitle(layer)} grid`),
      h("h2", {}, `Unit ${unit}`),
      h("span", { class: "cv-dim cv-unit-sub", title: layer.name }, `${layerTitle(layer)} · ${rfText(layer)} · top-${layer.k} · `,
        h("span", { class: "cv-name" }, layer.name)),
      h("button", { type: "button", class: "cv-button", disabled: !ordered && unit <= 0, onclick: () => go(-1),
        title: `Previous unit${order} (↑)` }, "‹ Previous unit"),
      h("button", { type: "button", class: "cv-button", disabled: !ordered && unit >= layer.units - 1, onclick: () => go(1),
        title: `Next unit${order} (↓)` }, "Next unit ›"),
      unitJump(layer, (next) => this.app.navigate({ unit: next }), unit),
      fieldNote(layer, this.app.state.field),
      showToggle(layer, this.app.state.show, (show) => this.app.navigate({ show })),
      besideSwitch(run, state.source, state.beside, (beside) => this.app.navigate({ beside })),
    );
  }

  /**
   * The top-k at `checkpoint` with its facts; `beside` (`{source, evolution}`, the evolution
   * possibly an Error) puts that source's top-k at the same step next to it.
   */
  renderCurrent(run, layer, unit, checkpoint, beside) {
    const records = checkpoint.records;
    const peak = records[0]?.value;
    const own = this.mosaics(run, layer, unit, checkpoint);
    return h("div", { class: "cv-card cv-unit-current" },
      h("h3", {}, `Top-${layer.k} at step ${checkpoint.step}`),
      h("div", { class: "cv-unit-current-body" },
        beside ? h("div", { class: "cv-side-by-side" },
          sourcePanel(this.app.state.source ?? "probe", checkpoint, own),
          this.besidePanel(run, layer, unit, checkpoint.step, beside)) : own,
        h("dl", { class: "cv-facts" },
          h("dt", {}, "Peak activation"), h("dd", {}, formatValue(peak)),
          h("dt", {}, "Kept since previous"), h("dd", {}, checkpoint.overlap == null ? "first checkpoint" : formatPercent(checkpoint.overlap)),
          h("dt", {}, "Top-1 image"), h("dd", {}, records[0] ? `#${records[0].image}${checkpoint.top1_changed ? " (new)" : ""}` : "–"),
          h("dt", {}, "Status"), h("dd", {}, checkpoint.not_finite ? "not finite (NaN or infinite activations, no ranks)"
            : peak != null && peak > 0 ? "active" : "dead (no positive activation)"))));
  }

  /** `beside.source`'s top-k at `step` in a panel naming it, or why it has none. */
  besidePanel(run, layer, unit, step, { source, evolution }) {
    const name = sourceName(source);
    if (evolution instanceof Error) return sourcePanel(source, null, message("error", `Could not load the ${name.toLowerCase()}`, evolution.message));
    const checkpoint = evolution.checkpoints.find((c) => c.step === step);
    return sourcePanel(source, checkpoint, checkpoint ? this.mosaics(run, layer, unit, checkpoint, source)
      : h("p", { class: "cv-dim" }, `No records from the ${name.toLowerCase()} at step ${step}.`));
  }

  /**
   * The patches' mosaic, the projections' mosaic at the same patch size, or both side by side
   * (Fig. 2). `source`: whose records `checkpoint` holds, when not the view's.
   */
  mosaics(run, layer, unit, checkpoint, source = undefined) {
    if (checkpoint.not_finite) return h("div", { class: "cv-mosaic-frame" }, notFiniteChip());
    const show = effectiveShow(this.app.state.show, layer);
    const patch = patchSizeFor(layer, MOSAIC_PX);
    const frames = [];
    if (show !== "projection") {
      const figure = new MosaicFigure(layer, patch, { alt: recordsAlt(unit, checkpoint.step, checkpoint.records) });
      figure.setRecords(checkpoint.records, { step: checkpoint.step, unit, source });
      this.feed.assign(figure.img, mosaicUrl(run.run, layer.name, checkpoint.step, unit, patch, source));
      frames.push(h("button", {
        type: "button", class: "cv-mosaic-frame", title: "Zoom: the patches large, at a size you pick (z)",
        onclick: () => this.zoom(checkpoint, source),
      }, figure.el));
    }
    if (show !== "patch") {
      const step = checkpoint.step;
      if (hasProjection(layer, step)) {
        const projection = new MosaicFigure(layer, patch,
          { alt: `Unit ${unit} at step ${step}: ${layer.projections.rule} projections of its top records` });
        projection.img.classList.add("cv-projection");
        assignProjection(this.feed, projection, { run: run.run, layer, step, unit, records: checkpoint.records, patch, source });
        frames.push(h("div", { class: "cv-mosaic-frame" }, projection.el));
      } else frames.push(h("p", { class: "cv-dim cv-no-projection" }, `No projections at step ${step}`));
    }
    return frames;
  }

  renderLabels(layer, checkpoint, source) {
    const counts = labelCounts(checkpoint.records);
    const body = counts
      ? h("ul", { class: "cv-histogram" }, counts.map(([label, count]) =>
          h("li", {},
            h("span", { class: "cv-hist-label", title: label }, label),
            h("span", { class: "cv-hist-bar" }, h("span", { style: { width: `${(100 * count) / checkpoint.records.length}%` } })),
            h("span", { class: "cv-hist-count" }, String(count)))))
      : h("p", { class: "cv-dim" }, source === "probe" ? "The probe set was logged without class labels."
        : `The ${sourceName(source).toLowerCase()} are unlabelled: pass labels= to maybe_log, or call label(y) after a forward, to see their classes.`);
    return h("div", { class: "cv-card" }, h("h3", {}, `Classes of its top-${layer.k} images`), body);
  }

  stripImages(run, layer, unit, step, record, box) {
    const show = effectiveShow(this.app.state.show, layer);
    const images = [];
    if (show !== "projection") images.push(this.image(patchUrl(run.run, layer.name, step, unit, record.rank, PATCH_PX), recordAlt(unit, step, record), box));
    if (show !== "patch") {
      images.push(hasProjection(layer, step, record.rank)
        ? this.image(projectionUrl(run.run, layer.name, step, unit, record.rank, PATCH_PX), `Projection of ${recordAlt(unit, step, record)}`, box, "cv-projection")
        : h("span", { class: "cv-dim cv-no-projection", title: "this record was not projected at this step" }, "–"));
    }
    return images;
  }

  renderStrip(run, layer, unit, checkpoints, current, expanded) {
    const { pw, ph } = mosaicGeometry(layer, PATCH_PX);
    const patchBox = { width: pw, height: ph };
    const columns = checkpoints.map((c) => {
      const records = expanded ? c.records : c.records.slice(0, 1);
      return h("li", {
        class: ["cv-evo-col", c.top1_changed && "cv-changed", c === current && "cv-selected"].filter(Boolean).join(" "),
        dataset: { step: String(c.step) },
      },
      h("span", { class: "cv-evo-head" },
        h("button", {
          type: "button", class: "cv-evo-step", "aria-label": `Select step ${c.step}`,
          onclick: () => this.app.navigate({ step: c.step }),
        }, c.top1_changed ? h("span", { class: "cv-marker", title: "top-1 image changed" }, "●") : null, String(c.step)),
        h("button", {
          type: "button", class: "cv-evo-zoom", "aria-label": `Zoom the top-${layer.k} at step ${c.step}`,
          title: `Zoom: the top-${layer.k} at step ${c.step}, large`, onclick: () => this.zoom(c),
        }, "⤢")),
      c.not_finite ? notFiniteChip() : null,
      records.map((r) => h("button", {
        type: "button", class: "cv-evo-patch", title: `${recordAlt(unit, c.step, r)}. Click: the whole ${imageNoun(currentSource())}`,
        onclick: () => showProbeImage({ run: run.run, layer, step: c.step, unit, record: r }),
      },
      this.stripImages(run, layer, unit, c.step, r, patchBox),
      h("span", { class: "cv-evo-value" }, formatValue(r.value)))));
    });
    const changes = checkpoints.filter((c) => c.top1_changed).length;
    return h("div", { class: "cv-card" },
      h("div", { class: "cv-card-head" },
        h("h3", {}, expanded ? `Top-${layer.k} at every checkpoint` : "Top-1 patch at every checkpoint"),
        h("span", { class: "cv-dim" }, `${checkpoints.length} checkpoints · top-1 changed ${changes} times (`,
          h("span", { class: "cv-marker" }, "●"), ")"),
        h("span", { class: "cv-spacer" }),
        h("button", {
          type: "button", class: "cv-button", "aria-pressed": String(expanded),
          onclick: () => this.app.navigate({ expand: expanded ? null : "1" }),
        }, expanded ? "Show top-1 only" : `Show top-${layer.k}`)),
      h("p", { class: "cv-caption" }, `Click a patch to see the whole ${imageNoun(currentSource())} with the unit's receptive field; click a step to select it, ⤢ to zoom its top-`,
        String(layer.k), ". Keys: ← → checkpoints, ↑ ↓ units, z zoom."),
      h("ol", { class: "cv-evo-strip", "aria-label": `Unit ${unit} over training` }, columns));
  }
}

/** `source`'s top-k (`body`) under its name and peak activation, for the side-by-side view. */
function sourcePanel(source, checkpoint, body) {
  const peak = checkpoint?.records[0]?.value;
  return h("figure", { class: "cv-source-panel", dataset: { source } },
    h("figcaption", {}, h("strong", {}, sourceName(source)), peak == null ? null : ` · peak ${formatValue(peak)}`),
    h("div", { class: "cv-source-panel-body" }, body));
}

/** Says when a patch cannot localise anything: the unit sees the whole probe image, or more. */
function fieldNote(layer, field) {
  const rf = layer.receptive_field, [inH, inW] = layer.input ?? [];
  if (rf?.method === "global") {
    return h("p", { class: "cv-dim cv-field-note" },
      "Every unit of this layer sees the whole probe image (a global receptive field), so each patch is the whole image.");
  }
  const [height, width] = rf?.size ?? [];
  if (inH && height >= inH && width >= inW) {
    return h("p", { class: "cv-dim cv-field-note" },
      `The receptive field (${height}×${width} px) covers the whole ${inH}×${inW} probe image: ` +
      (layer.effective_field && field !== "theoretical"
        ? "each patch shows the unit's smaller effective field, kept inside the image."
        : "each patch is the whole image, placed where the unit looks, with grey where the field runs past the image."));
  }
  return null;
}
