// The hot prefixes as a tree: the shared spine and its branches (from /trie/tree).
//
// Drawn as the walkthrough notebook draws a trie: each node is a bar from the
// depth (in tokens) where its edge starts to where it ends, spanning the rows
// of the branches below it; darker means more requests went through it. The
// spine -- the prefix most requests share -- is outlined. Hovering a node
// shows its depth, hits and decoded text; that text is a prompt, user data,
// and only ever set as text (see dom.js).

import { el, svg } from "./dom.js";
import { count, oneLine, shorten } from "./format.js";

const W = 1100;
const ROW_H = 24;
const PAD = { left: 8, right: 28, top: 6, bottom: 26 };
// A spine longer than this share of the deepest prefix is drawn at this
// share (the axis breaks where it ends), so the branches keep room to read.
const SPINE_SHARE = 0.4;

/** Token depth -> x: linear, or two linear pieces broken at the spine's end. */
function scale(maxDepth, spineDepth) {
  const width = W - PAD.left - PAD.right;
  if (spineDepth <= SPINE_SHARE * maxDepth || spineDepth >= maxDepth) {
    return { x: (d) => PAD.left + (d / maxDepth) * width, broken: null };
  }
  const split = SPINE_SHARE * width;
  return {
    x: (d) =>
      d <= spineDepth
        ? PAD.left + (d / spineDepth) * split
        : PAD.left + split + ((d - spineDepth) / (maxDepth - spineDepth)) * (width - split),
    broken: spineDepth,
  };
}

/** Row spans: leaves one row each, in order; a parent spans its children. */
function layout(nodes) {
  const children = new Map();
  const roots = [];
  for (const n of nodes) {
    if (n.parent === null) roots.push(n);
    else {
      if (!children.has(n.parent)) children.set(n.parent, []);
      children.get(n.parent).push(n);
    }
  }
  const spans = new Map();
  let next = 0;
  const visit = (n) => {
    const below = children.get(n.id) || [];
    if (!below.length) {
      spans.set(n.id, [next, next + 1]);
      next += 1;
      return;
    }
    below.sort((a, b) => b.hits - a.hits || a.id - b.id);
    below.forEach(visit);
    spans.set(n.id, [spans.get(below[0].id)[0], spans.get(below[below.length - 1].id)[1]]);
  };
  roots.sort((a, b) => b.hits - a.hits || a.id - b.id).forEach(visit);
  return { spans, rows: next };
}

function hoverText(n) {
  const start = n.depth - n.edge_tokens;
  return (
    `tokens ${start}–${n.depth} (${n.edge_tokens} on this edge) · ${n.hits} hits` +
    `${n.spine ? " · spine" : ""}` +
    `${n.hidden_children ? ` · ${n.hidden_children} less hit branch(es) not shown` : ""}` +
    `\n\nedge: ${n.text}\n\nprefix: ${n.prefix_text}`
  );
}

/** The tree's SVG and a caption naming the spine; ``detail`` shows the hovered node. */
export function drawTree(tree, detail) {
  const nodes = tree.nodes;
  const { spans, rows } = layout(nodes);
  const maxDepth = Math.max(...nodes.map((n) => n.depth));
  const maxHits = Math.max(...nodes.map((n) => n.hits));
  const height = PAD.top + rows * ROW_H + PAD.bottom;
  const shownBelow = new Set(nodes.map((n) => n.parent));
  const spine = nodes.filter((n) => n.spine);
  const spineDepth = spine.length ? spine[spine.length - 1].depth : 0;
  const { x, broken } = scale(maxDepth, spineDepth);
  const root = svg("svg", {
    viewBox: `0 0 ${W} ${height}`,
    class: "tree",
    "data-chart": "tree",
    "data-model": tree.model,
    role: "img",
  });
  const describe = (n) => {
    detail.replaceChildren(
      el("div", { class: "detail-head" }, hoverText(n).split("\n")[0]),
      el("div", { class: "detail-label", text: "this edge, decoded" }),
      el("pre", { class: "detail-text", text: n.text }),
      el("div", { class: "detail-label", text: "the prefix from the root" }),
      el("pre", { class: "detail-text", text: n.prefix_text }),
    );
  };
  for (const n of nodes) {
    const [lo, hi] = spans.get(n.id);
    const x0 = x(n.depth - n.edge_tokens);
    const width = Math.max(2, x(n.depth) - x0 - 1);
    const y0 = PAD.top + lo * ROW_H + 2;
    const h = (hi - lo) * ROW_H - 4;
    const shade = 0.18 + 0.72 * (n.hits / maxHits);
    const dark = shade > 0.55;
    const group = svg(
      "g",
      {
        class: `node${n.spine ? " spine" : ""}`,
        "data-node-id": n.id,
        "data-depth": n.depth,
        "data-hits": n.hits,
        "data-spine": n.spine ? "true" : "false",
        tabindex: 0,
        onmouseenter: () => describe(n),
        onfocus: () => describe(n),
      },
      svg("title", {}, hoverText(n)),
      svg("rect", {
        x: x0.toFixed(1),
        y: y0,
        width: width.toFixed(1),
        height: h,
        rx: 3,
        "fill-opacity": shade.toFixed(3),
        class: "node-bar",
      }),
    );
    const room = Math.floor((width - 8) / 6.6);
    if (room >= 6) {
      const words = oneLine(n.text);
      const label = `${shorten(words, Math.max(room - 8, 4))} · ${count(n.hits)}×`;
      group.append(
        svg(
          "text",
          {
            x: (x0 + 5).toFixed(1),
            y: y0 + h / 2 + 4,
            class: `node-label${dark ? " on-dark" : ""}`,
          },
          shorten(label, room),
        ),
      );
    }
    if (n.hidden_children > 0 && !shownBelow.has(n.id)) {
      // Only past a shown leaf: elsewhere a shown child sits where the mark would.
      group.append(
        svg(
          "text",
          { x: (x0 + width + 3).toFixed(1), y: y0 + h / 2 + 4, class: "tick" },
          `+${n.hidden_children}`,
        ),
      );
    }
    root.append(group);
  }
  const ticks = broken === null ? [0, maxDepth / 2, maxDepth] : [0, broken, maxDepth];
  for (const [i, d] of ticks.entries()) {
    root.append(
      svg(
        "text",
        { x: x(d), y: height - 8, class: "tick", "text-anchor": ["start", "middle", "end"][i] },
        `${Math.round(d)} tokens`,
      ),
    );
  }
  if (broken !== null) {
    // The break: two slashes on the axis where the scale changes.
    const bx = x(broken);
    root.append(
      svg("line", { x1: bx, x2: bx, y1: PAD.top, y2: height - PAD.bottom + 4, class: "axis-break" }),
    );
  }
  return { svg: root, caption: spineCaption(tree), broken };
}

function spineCaption(tree) {
  const spine = tree.nodes.filter((n) => n.spine);
  if (!spine.length) {
    return el(
      "p",
      { class: "caption", "data-spine-depth": 0 },
      "No spine: no prefix is shared by more than half of the requests.",
    );
  }
  const end = spine[spine.length - 1];
  const text = spine.map((n) => n.text).join("");
  return el(
    "p",
    { class: "caption", "data-spine-depth": end.depth, "data-spine-id": end.id },
    el("strong", { text: `Shared spine: ${count(end.depth)} tokens` }),
    `, ${count(end.hits)} of ${count(tree.requests)} requests went through it: `,
    el("q", { class: "spine-text", text: shorten(oneLine(text), 220) }),
  );
}
