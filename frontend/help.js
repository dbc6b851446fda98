// The keyboard help overlay (key: ?).

import { h } from "./dom.js";
import { openDialog } from "./widgets.js";

export const KEYS = [
  ["1 – 5", "Layer 1 to 5"],
  ["← →", "Previous / next checkpoint"],
  ["↑ ↓", "Previous / next unit, in the grid's order and filter (unit view)"],
  ["g", "Go to a unit by number (layer grid)"],
  ["z", "Zoom: the unit under the pointer (grid) or shown (unit view), large"],
  ["+ −", "Larger / smaller patches (in the zoom)"],
  ["Esc", "Close a dialog; back from a unit to its layer"],
  ["?", "This help"],
];

export function showHelp() {
  return openDialog({ title: "Keyboard shortcuts", className: "cv-help" },
    h("dl", { class: "cv-facts cv-keys" }, KEYS.map(([key, what]) => [h("dt", {}, h("kbd", {}, key)), h("dd", {}, what)])),
    h("p", { class: "cv-caption" }, "Keys work when no text field has the focus. A click on any mosaic or patch opens it large too."));
}
