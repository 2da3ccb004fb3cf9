// The figures beside the charts: summary tiles, upstreams, tracking health and its warnings.

import { sparkline } from "./charts.js";
import { el } from "./dom.js";
import { count, ms, pct, tokens } from "./format.js";

function tile(id, label, value, sub) {
  return el(
    "div",
    { class: "tile", "data-tile": id },
    el("div", { class: "tile-label", text: label }),
    el("div", { class: "tile-value", text: value }),
    el("div", { class: "tile-sub", text: sub || "" }),
  );
}

/** "12.5 / 40.1 ms": two latencies sharing one unit when both are under a second. */
function pair(a, b) {
  const under = (v) => v === null || v === undefined || v < 1000;
  if (under(a) && under(b) && (a ?? b) !== null && (a ?? b) !== undefined) {
    return `${ms(a).replace(" ms", "")} / ${ms(b)}`;
  }
  return `${ms(a)} / ${ms(b)}`;
}

/** The window's headline figures (from /analytics). */
export function tiles(analytics) {
  const s = analytics.summary;
  const pvr = s.predicted_vs_reported;
  const ttfb = analytics.ttfb_by_hit?.overall;
  const cal = analytics.calibration || [];
  const calN = cal.reduce((a, c) => a + c.requests, 0);
  const exact = calN ? cal.reduce((a, c) => a + c.exact_share * c.requests, 0) / calN : null;
  return [
    tile("requests", "requests", count(s.requests), `${count(s.errors)} errors`),
    tile("hit_rate", "hit rate", pct(s.hit_rate), `${count(s.hits)} hits · ${count(s.misses)} misses`),
    tile(
      "token_reuse",
      "token reuse",
      pct(s.token_reuse_ratio),
      `${tokens(s.matched_tokens)} of ${tokens(s.prompt_tokens)} prompt tokens`,
    ),
    tile(
      "cached",
      "reported / predicted cached",
      pvr.reported_to_predicted_ratio === null ? "—" : pvr.reported_to_predicted_ratio.toFixed(3),
      `${tokens(pvr.reported_cached_tokens)} reported · ${tokens(pvr.predicted_cached_tokens)} predicted`,
    ),
    tile("exact", "predictions exact", pct(exact), `${count(calN)} requests with a report`),
    tile(
      "ttfb",
      "TTFB p50 hit / miss",
      pair(ttfb?.hit?.p50, ttfb?.miss?.p50),
      `p90 ${ms(ttfb?.hit?.p90)} / ${ms(ttfb?.miss?.p90)}`,
    ),
  ];
}

function pill(state, text) {
  return el("span", { class: `pill ${state}`, text });
}

function kv(label, value, attrs = {}) {
  return el("div", { class: "kv", ...attrs }, el("span", { text: label }), el("b", { text: value }));
}

/**
 * One card per upstream: health, circuit, load now and over the page's last
 * samples (``history``: name -> load tokens), and its share of the window.
 */
export function upstreams(health, analytics, history) {
  const byName = new Map((analytics?.by_upstream || []).map((u) => [u.upstream, u]));
  const routed = health.routing?.upstreams;
  if (!routed) {
    const u = health.upstream || {};
    const a = byName.get(u.name) || {};
    return [
      el(
        "div",
        { class: "upstream", "data-upstream": u.name, "data-healthy": String(!!u.reachable) },
        el(
          "div",
          { class: "up-head" },
          el("b", { text: u.name }),
          pill(u.reachable ? "ok" : "bad", u.reachable ? "reachable" : "unreachable"),
          u.circuit ? pill(u.circuit === "closed" ? "ok" : u.circuit === "open" ? "bad" : "warn", `circuit ${u.circuit}`) : null,
        ),
        el("div", { class: "up-url", text: u.url || "" }),
        kv("probe", u.reachable ? `${u.status} in ${ms(u.latency_ms)}` : u.error || "—"),
        u.load ? kv("in flight", `${count(u.load.in_flight)} · ${count(u.load.decoding)} decoding · ${tokens(u.load.prefill_tokens)} prefill tokens`) : null,
        kv("requests (window)", count(a.requests ?? 0)),
        kv("hit rate", pct(a.hit_rate)),
        kv("stale retries", count(u.stale_retries ?? 0)),
        el("p", { class: "note", text: "One upstream: list replicas under upstreams: in config.yaml for cache-aware routing among them." }),
      ),
    ];
  }
  return routed.map((u) => {
    const a = byName.get(u.name) || {};
    const load = u.load;
    const held = Object.values(u.cache || {}).reduce((s, c) => s + c.held_tokens, 0);
    const limit = u.max_concurrency ? ` / ${u.max_concurrency}` : "";
    return el(
      "div",
      {
        class: "upstream",
        "data-upstream": u.name,
        "data-healthy": String(u.healthy),
        "data-circuit": u.circuit,
        "data-in-flight": load.in_flight,
      },
      el(
        "div",
        { class: "up-head" },
        el("b", { text: u.name }),
        pill(u.healthy ? "ok" : "bad", u.healthy ? "healthy" : "unhealthy"),
        pill(u.circuit === "closed" ? "ok" : u.circuit === "open" ? "bad" : "warn", `circuit ${u.circuit}`),
      ),
      el("div", { class: "up-url", text: u.url }),
      el(
        "div",
        { class: "kv" },
        el("span", { text: "load (tokens), recent" }),
        sparkline(history.get(u.name) || [load.tokens], "load"),
        el("b", { text: tokens(load.tokens) }),
      ),
      kv("in flight", `${count(load.in_flight)}${limit} · ${count(load.decoding)} decoding`),
      kv("requests (window)", `${count(a.requests ?? 0)} · hit rate ${pct(a.hit_rate)}`),
      kv("failures · failovers", `${count(u.failures)} · ${count(u.failovers)}`),
      kv("modelled cache", `${tokens(held)} tokens held`),
      u.last_error ? el("div", { class: "up-error", text: `last error: ${u.last_error}` }) : null,
    );
  });
}

function sum(obj) {
  return Object.values(obj || {}).reduce((a, b) => a + Number(b || 0), 0);
}

/** What needs a look, each a [kind, message] pair; none when tracking is healthy. */
export function warnings(health, analytics) {
  const out = [];
  const t = health.tracking || {};
  const brain = t.brain || {};
  if (brain.state && brain.state !== "up") {
    out.push(["brain", `Tracking process is ${brain.state}: requests flow untracked${brain.last_exit ? ` (last exit: ${brain.last_exit})` : ""}.`]);
  }
  if ((t.backlog || 0) > 0) out.push(["backlog", `Tracking backlog: ${count(t.backlog)} request(s) waiting for the tracking thread.`]);
  const skipped = (t.skipped_backlog || 0) + (t.skipped_brain_down || 0) + sum(t.skipped);
  if (skipped > 0) {
    const reasons = Object.entries(t.skipped || {}).map(([k, v]) => `${k} ${v}`);
    out.push(["skipped", `${count(skipped)} request(s) skipped by tracking (backlog ${t.skipped_backlog || 0}, brain down ${t.skipped_brain_down || 0}${reasons.length ? `, ${reasons.join(", ")}` : ""}).`]);
  }
  if (sum(t.errors) > 0) out.push(["errors", `Tracking errors: ${Object.entries(t.errors).map(([k, v]) => `${k} ${v}`).join(", ")}.`]);
  for (const model of health.approximate_tokenizers || []) {
    out.push(["fallback", `Model ${model} uses the approximate (fallback) tokenizer: its figures are estimates.`]);
  }
  for (const [model, r] of Object.entries(health.parity || {})) {
    if (r.status === "mismatch" || r.status === "error") {
      out.push(["parity", `Parity ${r.status} for ${model} at ${r.upstream}: kvern's tokens differ from the backend's${r.detail ? ` (${r.detail})` : ""}.`]);
    }
  }
  if (health.tokenizer_hub?.state === "unreachable") out.push(["hub", `Tokenizer hub unreachable: ${health.tokenizer_hub.error || ""}`]);
  const store = analytics?.store || {};
  const lostRows = (store.dropped || 0) + (store.lost || 0) + (store.write_errors || 0);
  if (lostRows > 0) out.push(["store", `Analytics store: ${store.dropped} rows dropped, ${store.lost} lost, ${store.write_errors} write errors.`]);
  const tr = analytics?.tracking;
  if (tr && !tr.drained) out.push(["pending", `Tracking has ${count(tr.pending)} answered request(s) still to land${Object.keys(tr.waiting_for_tokenizer || {}).length ? `; waiting for tokenizers: ${Object.keys(tr.waiting_for_tokenizer).join(", ")}` : ""}.`]);
  return out;
}

/** Tracking's figures, one line each (from /health and /analytics). */
export function trackingRows(health, analytics) {
  const t = health.tracking || {};
  const brain = t.brain || {};
  const kinds = Object.entries(health.tokenizers || {}).map(([m, s]) => `${m}: ${s.kind || s.state || "?"}`);
  const parity = Object.entries(health.parity || {}).map(([m, r]) => `${m}: ${r.status}`);
  const skipped = (t.skipped_backlog || 0) + (t.skipped_brain_down || 0) + sum(t.skipped);
  return [
    kv("tracking process", `${brain.state || "?"}${brain.pid ? ` (pid ${brain.pid})` : ""} · ${count(brain.restarts || 0)} restarts`, { "data-row": "brain" }),
    kv("tracked · untracked", `${count(t.tracked)} · ${count(t.untracked)}`, { "data-row": "tracked" }),
    kv("backlog", count(t.backlog ?? 0), { "data-row": "backlog" }),
    kv("skipped", count(skipped), { "data-row": "skipped" }),
    kv("fallback tokenizers", (health.approximate_tokenizers || []).join(", ") || "none", { "data-row": "fallback" }),
    kv("tokenizers", kinds.join(" · ") || "none loaded yet", { "data-row": "tokenizers" }),
    kv("parity with the backend", parity.join(" · ") || (health.parity === null ? "off" : "not checked yet"), { "data-row": "parity" }),
    kv("rows pending", count(analytics?.tracking?.pending ?? 0), { "data-row": "pending" }),
  ];
}
