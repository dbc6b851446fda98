// Finding units: jump to a unit by number, and filter a layer's units by what they are.

import { h, select } from "./dom.js";
import { CHANGED_BELOW } from "./widgets.js";

/** A number field that calls `onGo(unit)` on Enter with a valid unit of `layer`. */
export function unitJump(layer, onGo, value = "") {
  const input = h("input", {
    type: "number", class: "cv-unit-jump", min: 0, max: layer.units - 1, step: 1, value: String(value),
    placeholder: `0–${layer.units - 1}`, "aria-label": "Go to unit", title: "Type a unit number and press Enter (key: g)",
    onkeydown: (e) => {
      if (e.key !== "Enter") return;
      const unit = Number(input.value);
      const valid = input.value !== "" && Number.isInteger(unit) && unit >= 0 && unit < layer.units;
      input.setCustomValidity(valid ? "" : `Units are 0 to ${layer.units - 1}`);
      input.reportValidity();
      if (valid) onGo(unit);
    },
  });
  return h("label", { class: "cv-field" }, "Unit", input);
}

/**
 * Filter options for a layer's units at a checkpoint: all, dead, changed since the previous
 * checkpoint, and one per probe class (its name, else its integer label) found among their top-k.
 */
export function filterOptions(units, k) {
  const labels = new Map();
  for (const unit of units) {
    for (const r of unit.records) if (r.label != null) labels.set(r.label, r.label_name ?? String(r.label));
  }
  return [
    ["", "All units"],
    ["dead", "Dead"],
    ["changed", `Changed (kept < ${Math.round(CHANGED_BELOW * 100)}% of top-${k})`],
    ...[...labels].sort((a, b) => a[0] - b[0]).map(([label, text]) => [`class:${label}`, `Class ${text} in top-${k}`]),
  ];
}

/** Whether `unit` (a `topk` unit) passes `filter` ("", "dead", "changed" or "class:<label>"). */
export function passes(unit, filter) {
  if (!filter) return true;
  if (filter === "dead") return unit.dead;
  if (filter === "changed") return unit.overlap != null && unit.overlap < CHANGED_BELOW;
  if (filter.startsWith("class:")) {
    const label = Number(filter.slice(6));
    return unit.records.some((r) => r.label === label);
  }
  return true;
}

export function filterSelect(options, value, onChange) {
  return h("label", { class: "cv-field" }, "Show",
    select(options, options.some(([v]) => v === value) ? value : "", onChange, { "aria-label": "Filter units" }));
}
