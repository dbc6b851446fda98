// A small SVG line chart built from DOM nodes (no innerHTML), one line per series.

import { h, svg } from "./dom.js";

const MARGIN = { top: 10, right: 14, bottom: 26, left: 44 };

function niceTicks(min, max, count = 5) {
  if (max <= min) return [min];
  const raw = (max - min) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(min / step) * step; t <= max + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

/**
 * `series`: `[{label, className, points: [[x, y|null], ...]}]`; gaps where y is null.
 * `onPoint(series, x)` is called when a point is clicked.
 */
export function lineChart({ series, yMax = 1, width = 640, height = 220, yFormat, xLabel, title, onPoint }) {
  const xs = series.flatMap((s) => s.points.map(([x]) => x));
  const xMin = Math.min(...xs);
  const xMax = Math.max(...xs);
  const inner = { w: width - MARGIN.left - MARGIN.right, h: height - MARGIN.top - MARGIN.bottom };
  const sx = (x) => MARGIN.left + (xMax === xMin ? inner.w / 2 : ((x - xMin) / (xMax - xMin)) * inner.w);
  const sy = (y) => MARGIN.top + inner.h - (Math.min(y, yMax) / yMax) * inner.h;
  const dense = xs.length > 80 * Math.max(series.length, 1);
  const root = svg("svg", {
    class: "cv-chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title,
  }, svg("title", {}, title));

  for (const t of niceTicks(0, yMax, Math.max(2, Math.round(height / 55)))) {
    root.append(
      svg("line", { class: "cv-grid-line", x1: MARGIN.left, x2: width - MARGIN.right, y1: sy(t), y2: sy(t) }),
      svg("text", { class: "cv-axis-label", x: MARGIN.left - 6, y: sy(t), "text-anchor": "end", "dominant-baseline": "middle" }, yFormat(t)),
    );
  }
  for (const t of niceTicks(xMin, xMax, Math.max(2, Math.round(width / 110)))) {
    root.append(svg("text", {
      class: "cv-axis-label", x: sx(t), y: height - MARGIN.bottom + 16, "text-anchor": "middle",
    }, String(t)));
  }
  root.append(svg("text", {
    class: "cv-axis-label", x: width - MARGIN.right, y: height - 2, "text-anchor": "end",
  }, xLabel));

  for (const s of series) {
    let d = "";
    let pen = "M";
    for (const [x, y] of s.points) {
      if (y == null) {
        pen = "M";
        continue;
      }
      d += `${pen}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`;
      pen = "L";
    }
    const group = svg("g", { class: `cv-series ${s.className}` }, svg("path", { d }));
    for (const [x, y] of s.points) {
      if (y == null) continue;
      group.append(svg("circle", {
        cx: sx(x), cy: sy(y), r: dense ? 1.5 : 3,
        onclick: onPoint ? () => onPoint(s, x) : null,
      }, svg("title", {}, `${s.label} · step ${x}: ${yFormat(y)}`)));
    }
    root.append(group);
  }
  return h("figure", { class: "cv-figure" }, root);
}
