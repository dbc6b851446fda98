// The "Images" switch: whose top-k every view shows, the fixed probe set's or a stream's
// (the training or validation images the model saw). It is part of the view state (`source`).

import { h, select } from "./dom.js";
import { setSource } from "./api.js";

export const SOURCES = [["probe", "Probe set"], ["train", "Training images"], ["eval", "Validation images"]];

/** `wanted` if `run` logged that source; otherwise the probe set (left out of the state). */
export function validSource(run, wanted) {
  return (run?.streams ?? []).includes(wanted) ? wanted : undefined;
}

/** Send the state's source with every record request. */
export const useSource = (state) => setSource(state.source ?? "probe");

/** The switch for `run`, disabled (saying why) when the run logged no stream. */
export function sourceSwitch(run, current, onChange) {
  const streams = run?.streams ?? [];
  const control = select(SOURCES, current ?? "probe", (value) => onChange(value === "probe" ? undefined : value), {
    class: "cv-source-select", "aria-label": "Images",
    disabled: streams.length ? null : true,
    title: streams.length ? "Rank the probe set, or the images the model saw in training or validation"
      : "This run logged no training or validation stream: pass stream=(\"train\", \"eval\") to ConvVizLogger",
  });
  for (const option of control.options) {
    if (option.value !== "probe" && !streams.includes(option.value)) {
      option.disabled = true;
      option.title = `This run logged no ${option.value === "train" ? "training" : "validation"} stream`;
    }
  }
  return h("label", { class: "cv-field cv-source" }, "Images", control);
}
