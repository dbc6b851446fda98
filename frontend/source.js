// The "Images" switch: whose top-k every view shows, the fixed probe set's or a stream's
// (the training or validation images the model saw). It is part of the view state (`source`).
// The unit view can also show another source's top-k beside the view's (`beside`).

import { h, select } from "./dom.js";
import { setSource } from "./api.js";

export const SOURCES = [["probe", "Probe set"], ["train", "Training images"], ["eval", "Validation images"]];

const NO_STREAMS = "This run logged no training or validation stream: pass stream=(\"train\", \"eval\") to ConvVizLogger";

/** What one of `source`'s images is called: "probe image", "training image", "validation image". */
export const imageNoun = (source) => ({ train: "training image", eval: "validation image" })[source] ?? "probe image";

/** What the switch calls `source`. */
export const sourceName = (source) => SOURCES.find(([key]) => key === source)?.[1] ?? source;

/** `wanted` if `run` logged that source; otherwise the probe set (left out of the state). */
export function validSource(run, wanted) {
  return (run?.streams ?? []).includes(wanted) ? wanted : undefined;
}

/** `wanted` if `run` logged it and the view (showing `source`) does not show it already; else undefined. */
export function validBeside(run, source, wanted) {
  return wanted !== (source ?? "probe") && (wanted === "probe" || validSource(run, wanted)) ? wanted : undefined;
}

/** Send the state's source with every record request. */
export const useSource = (state) => setSource(state.source ?? "probe");

/** A source select for `run`: disabled (saying why) without streams; the streams it did not log disabled too. */
function sourceSelect(run, options, current, onChange, props) {
  const streams = run?.streams ?? [];
  const control = select(options, current, onChange, { ...props, disabled: streams.length ? null : true,
    title: streams.length ? props.title : NO_STREAMS });
  for (const option of control.options) {
    if (["train", "eval"].includes(option.value) && !streams.includes(option.value)) {
      option.disabled = true;
      option.title = `This run logged no ${option.value === "train" ? "training" : "validation"} stream`;
    }
  }
  return control;
}

/** The switch for `run`. */
export function sourceSwitch(run, current, onChange) {
  const control = sourceSelect(run, SOURCES, current ?? "probe", (value) => onChange(value === "probe" ? undefined : value), {
    class: "cv-source-select", "aria-label": "Images",
    title: "Rank the probe set, or the images the model saw in training or validation",
  });
  return h("label", { class: "cv-field cv-source" }, "Images", control);
}

/** The unit view's "Beside" choice: another source's top-k next to the one the switch picks (`source`). */
export function besideSwitch(run, source, current, onChange) {
  const control = sourceSelect(run, [["", "Nothing"], ...SOURCES], current ?? "", (value) => onChange(value || undefined), {
    class: "cv-beside-select", "aria-label": "Beside",
    title: "Show another source's top-k at this checkpoint beside this one, e.g. the probe set beside the training images",
  });
  const shown = control.querySelector(`option[value="${source ?? "probe"}"]`);
  shown.disabled = true;
  shown.title = "Shown already: the Images switch picks it";
  return h("label", { class: "cv-field cv-beside" }, "Beside", control);
}
