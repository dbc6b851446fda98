// What a patch shows: the unit's effective receptive field (the default), kept inside the probe image,
// or its whole theoretical field (`field=theoretical` in the URL), padded grey where it runs off the image.

import { h } from "./dom.js";
import { setCropField } from "./api.js";

export const FIELDS = [["effective", "Effective field"], ["theoretical", "Theoretical field"]];

/** Keep only a non-default `field` in the state; returns whether the image routes now crop differently. */
export function applyField(state) {
  if (state.field !== "theoretical") delete state.field;
  return setCropField(state.field ?? null);
}

const hasEffective = (run) => run.layers.some((layer) => layer.effective_field);

/** The Effective / Theoretical switch, or, for a run logged without effective fields, a note that says so. */
export function fieldBar(app) {
  const run = app.run;
  if (!hasEffective(run)) {
    return h("p", { class: "cv-dim cv-field-missing" },
      "This run has no effective receptive fields (it was logged before tb-convviz measured them), " +
      "so every patch shows the unit's whole theoretical field, grey where that runs past the image.");
  }
  const current = app.state.field ?? FIELDS[0][0];
  const share = run.layers.find((layer) => layer.effective_field)?.effective_field.mass_share;
  return h("div", { class: "cv-field-bar" },
    h("span", { class: "cv-field" }, "Crops",
      h("div", { class: "cv-segmented cv-field-switch", role: "radiogroup", "aria-label": "Crops" },
        FIELDS.map(([key, label]) => h("button", {
          type: "button", role: "radio", "aria-checked": String(key === current), class: "cv-segment",
          dataset: { field: key },
          onclick: () => app.navigate({ field: key === "effective" ? null : key }),
        }, label)))),
    h("span", { class: "cv-dim cv-caption" }, current === "effective"
      ? `Each patch is the unit's effective receptive field at that checkpoint: the smallest centred box holding ` +
        `${Math.round(share * 100)}% of the input-gradient mass of a centre unit (Luo et al., 2016), kept inside the image.`
      : "Each patch is the unit's whole theoretical receptive field, grey where it runs past the image."));
}
