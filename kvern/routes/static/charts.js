// Small SVG charts: lines over time and grouped bars, each point carrying its figure.
//
// Why hand-drawn: no CDN, no build step, and nothing to vendor for two chart
// kinds. Every point is an element with data-chart, data-series, data-value
// (the exact figure from /analytics, unrounded) and, over time, data-ts (the
// bucket's start, s), so what the page shows can be checked against the API.

import { el, svg } from "./dom.js";
import { clock } from "./format.js";

const W = 560;
const H = 210;
const PAD = { left: 58, right: 14, top: 12, bottom: 28 };

/** A round upper bound for an axis (1, 2, 2.5, 5 x 10^n) at or above ``value``. */
export function niceMax(value) {
  if (!(value > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= value) return m * p;
  return 10 * p;
}

function legend(series) {
  return el(
    "div",
    { class: "legend" },
    series.map((s) =>
      el("span", { class: "key" }, el("i", { class: `swatch ${s.cls}` }), s.label),
    ),
  );
}

/**
 * Lines over time. ``series``: [{key, label, cls, points: [{ts, value, note}]}];
 * ``bucketS``: the bucket's width (points sit at its middle); ``fmt``: axis and
 * tooltip format; ``yMax``: a fixed top (ratios) instead of the data's;
 * ``marks``: [{ts, kind, label, note}] moments drawn as dashed vertical lines
 * (the normalization rules changed), each with data-mark and data-ts.
 */
export function lineChart({ id, series, bucketS, fmt, yMax, marks = [] }) {
  const all = series.flatMap((s) => s.points);
  const tsList = all.map((p) => p.ts);
  let t0 = Math.min(...tsList);
  let t1 = Math.max(...tsList) + bucketS;
  // A mark sits at its own time (not a bucket's middle): the axis reaches it.
  for (const m of marks) {
    t0 = Math.min(t0, m.ts);
    t1 = Math.max(t1, m.ts);
  }
  if (t1 - t0 < 2 * bucketS) {
    t0 -= bucketS; // a lone bucket sits in the middle, not on an edge
    t1 += bucketS;
  }
  const top = yMax ?? niceMax(Math.max(...all.map((p) => p.value)));
  const x = (ts) => PAD.left + ((ts + bucketS / 2 - t0) / (t1 - t0)) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - (v / top) * (H - PAD.top - PAD.bottom);
  const root = svg("svg", {
    viewBox: `0 0 ${W} ${H}`,
    class: "chart",
    "data-chart": id,
    role: "img",
  });
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    root.append(
      svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v), class: "grid" }),
      svg("text", { x: PAD.left - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, fmt(v)),
    );
  }
  const ticks = [t0, (t0 + t1) / 2, t1];
  ticks.forEach((ts, i) => {
    const anchor = ["start", "middle", "end"][i];
    const px = PAD.left + (i / 2) * (W - PAD.left - PAD.right);
    root.append(
      svg("text", { x: px, y: H - 8, class: "tick", "text-anchor": anchor }, clock(ts)),
    );
  });
  for (const m of marks) {
    const px = x(m.ts - bucketS / 2).toFixed(1);
    root.append(
      svg(
        "g",
        { class: "mark", "data-chart": id, "data-mark": m.kind, "data-ts": m.ts },
        svg("line", { x1: px, x2: px, y1: PAD.top, y2: H - PAD.bottom }),
        svg("text", { x: Number(px) + 3, y: PAD.top + 9 }, m.label),
        svg("title", {}, `${m.label} at ${clock(m.ts)}${m.note ? ` (${m.note})` : ""}`),
      ),
    );
  }
  for (const s of series) {
    // A bucket with no requests breaks the line: nothing happened there.
    let run = [];
    const runs = [run];
    let previous = null;
    for (const p of s.points) {
      if (previous !== null && p.ts - previous > bucketS) runs.push((run = []));
      run.push(p);
      previous = p.ts;
    }
    for (const r of runs.filter((r) => r.length > 1)) {
      const d = r.map((p, i) => `${i ? "L" : "M"}${x(p.ts).toFixed(1)},${y(p.value).toFixed(1)}`);
      root.append(svg("path", { d: d.join(""), class: `line ${s.cls}` }));
    }
    for (const p of s.points) {
      root.append(
        svg(
          "circle",
          {
            cx: x(p.ts).toFixed(1),
            cy: y(p.value).toFixed(1),
            r: 3.5,
            class: `point ${s.cls}`,
            "data-chart": id,
            "data-series": s.key,
            "data-ts": p.ts,
            "data-value": p.value,
          },
          svg("title", {}, `${s.label}: ${fmt(p.value)} at ${clock(p.ts)}${p.note ? ` (${p.note})` : ""}`),
        ),
      );
    }
  }
  return el("figure", { class: "figure" }, legend(series), root);
}

/**
 * Grouped horizontal bars. ``groups``: [{label, attrs, bars: [{key, cls, value}]}];
 * each bar's element carries data-series, data-value and the group's attrs.
 */
export function barChart({ id, groups, series, fmt }) {
  const rowH = 16;
  const gap = 14;
  const labelW = 170;
  const height = groups.length * (series.length * rowH + gap) + 8;
  const top = niceMax(Math.max(...groups.flatMap((g) => g.bars.map((b) => b.value))));
  const root = svg("svg", {
    viewBox: `0 0 ${W} ${height}`,
    class: "chart bars",
    "data-chart": id,
    role: "img",
  });
  let yPos = 4;
  for (const g of groups) {
    root.append(svg("text", { x: 0, y: yPos + rowH, class: "bar-label" }, g.label));
    for (const b of g.bars) {
      const width = Math.max(1, (b.value / top) * (W - labelW - 80));
      root.append(
        svg(
          "rect",
          {
            x: labelW,
            y: yPos,
            width: width.toFixed(1),
            height: rowH - 3,
            class: `bar ${b.cls}`,
            "data-chart": id,
            "data-series": b.key,
            "data-value": b.value,
            ...g.attrs,
          },
          svg("title", {}, `${g.label} · ${b.key}: ${fmt(b.value)}`),
        ),
        svg("text", { x: labelW + width + 6, y: yPos + rowH - 5, class: "tick" }, fmt(b.value)),
      );
      yPos += rowH;
    }
    yPos += gap;
  }
  return el("figure", { class: "figure" }, legend(series), root);
}

/** A tiny line of the last samples (the page's own, not from /analytics). */
export function sparkline(values, cls) {
  const w = 120;
  const h = 26;
  const top = niceMax(Math.max(1, ...values));
  const step = values.length > 1 ? w / (values.length - 1) : 0;
  const yOf = (v) => (h - 2 - (v / top) * (h - 4)).toFixed(1);
  // One sample (the page just opened) is a level line: the load now.
  const d =
    values.length > 1
      ? values.map((v, i) => `${i ? "L" : "M"}${(i * step).toFixed(1)},${yOf(v)}`).join("")
      : `M0,${yOf(values[0] || 0)}L${w},${yOf(values[0] || 0)}`;
  return svg(
    "svg",
    { viewBox: `0 0 ${w} ${h}`, class: "spark", "data-samples": values.length },
    svg("path", { d, class: `line ${cls}` }),
  );
}
