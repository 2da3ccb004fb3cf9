// The dashboard: asks kvern's JSON endpoints every few seconds and redraws each panel.
//
// One refresh at a time: the next is scheduled only when the last has ended,
// so a slow kvern never piles requests up. The admin key, when kvern has one,
// is kept in this browser and sent with every data request; /health (which
// answers anyone, in detail only with the key) says whether it is needed, so
// the page asks for the key without first collecting a 401.

import { AuthRequired, adminKey, getJSON, setAdminKey } from "./api.js";
import { barChart, lineChart } from "./charts.js";
import { el, noRequests, show } from "./dom.js";
import { clock, ms, pct, tokens } from "./format.js";
import { tiles, trackingRows, upstreams, warnings } from "./panels.js";
import { drawMisses } from "./misses.js";
import { drawTree } from "./tree.js";

const REFRESH_MS = 5000;
const LOAD_SAMPLES = 60;
const RANGES = [
  ["1h", 10, "last hour · 10 s buckets"],
  ["24h", 600, "last 24 h · 10 min buckets"],
  ["7d", 3600, "last 7 days · 1 h buckets"],
  ["all", 86400, "everything · 1 day buckets"],
];

const $ = (id) => document.getElementById(id);
const state = { timer: null, running: false, again: false, refreshes: 0, loadHistory: new Map(), model: null };

function range() {
  const q = new URLSearchParams(location.search);
  const window = q.get("window") || "1h";
  const bucket = Number(q.get("bucket")) || (RANGES.find((r) => r[0] === window) || RANGES[0])[1];
  return { window, bucket };
}

function setupRange() {
  const select = $("range");
  const { window, bucket } = range();
  let found = false;
  for (const [w, b, label] of RANGES) {
    const selected = w === window && b === bucket;
    found ||= selected;
    select.append(el("option", { value: `${w}/${b}`, selected }, label));
  }
  if (!found) {
    select.append(el("option", { value: `${window}/${bucket}`, selected: true }, `${window} · ${bucket} s buckets`));
  }
  select.addEventListener("change", () => {
    const [w, b] = select.value.split("/");
    const q = new URLSearchParams(location.search);
    q.set("window", w);
    q.set("bucket", b);
    history.replaceState(null, "", `${location.pathname}?${q}`);
    refreshNow();
  });
}

// -- the admin key --------------------------------------------------------------

function askForKey(message) {
  $("login").hidden = false;
  $("login-message").textContent = message;
  $("login-key").focus();
  document.body.dataset.auth = "required";
  $("updated").textContent = "waiting for the admin key";
}

function setupLogin() {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setAdminKey($("login-key").value.trim());
    $("login-key").value = "";
    $("login").hidden = true;
    document.body.dataset.auth = "sent";
    refreshNow();
  });
  $("forget-key").addEventListener("click", () => {
    setAdminKey(null);
    refreshNow();
  });
}

// -- panels ---------------------------------------------------------------------

function points(series, pick, note) {
  return series
    .map((p) => ({ ts: p.bucket_start_s, value: pick(p), note: note ? note(p) : "" }))
    .filter((p) => p.value !== null && p.value !== undefined);
}

function chartOrEmpty(id, series, opts) {
  const target = $(id);
  if (!series.some((s) => s.points.length)) {
    show(target, (opts.empty && opts.empty()) || noRequests("requests"));
    return;
  }
  show(target, lineChart({ id: id.replace("chart-", ""), series, ...opts }));
}

function drawCharts(a, bucketS) {
  const ts = a.timeseries || [];
  // A fresh element for each panel that has nothing to show.
  const empty = () => (a.summary.requests === 0 ? noRequests("requests") : null);
  const reqs = (p) => `${p.requests} requests`;
  // Each live reload of the normalization rules, on every time chart: reuse before and after.
  const marks = (a.rules_changes || []).map((c) => ({
    ts: c.ts_s,
    kind: "rules_changed",
    label: "rules changed",
    note: `${c.models.join(", ")}; rules ${c.rules_hash}`,
  }));
  chartOrEmpty(
    "chart-reuse",
    [
      { key: "hit_rate", label: "hit rate", cls: "s-hit", points: points(ts, (p) => p.hit_rate, reqs) },
      { key: "token_reuse_ratio", label: "token reuse", cls: "s-reuse", points: points(ts, (p) => p.token_reuse_ratio, reqs) },
    ],
    { bucketS, fmt: pct, yMax: 1, empty, marks },
  );
  const reported = ts.filter((p) => p.predicted_vs_reported.requests_with_report > 0);
  const pvr = (k) => (p) => p.predicted_vs_reported[k];
  const withReport = (p) => `${p.predicted_vs_reported.requests_with_report} with a report`;
  chartOrEmpty(
    "chart-calibration",
    [
      { key: "predicted", label: "predicted cached", cls: "s-pred", points: points(reported, pvr("predicted_cached_tokens"), withReport) },
      { key: "reported", label: "backend-reported cached", cls: "s-rep", points: points(reported, pvr("reported_cached_tokens"), withReport) },
    ],
    {
      bucketS,
      fmt: tokens,
      marks,
      empty: () =>
        empty() ||
        el("div", { class: "empty", text: "No backend has reported cached tokens yet: llama.cpp and vLLM (--enable-prompt-tokens-details) do; Ollama's OpenAI API does not." }),
    },
  );
  const lat = a.ttfb_by_hit?.timeseries || [];
  const n = (k) => (p) => `${p[k].requests} requests`;
  chartOrEmpty(
    "chart-ttfb",
    [
      { key: "hit", label: "hits, p50", cls: "s-hit", points: points(lat, (p) => p.hit.p50, n("hit")) },
      { key: "miss", label: "misses, p50", cls: "s-miss", points: points(lat, (p) => p.miss.p50, n("miss")) },
    ],
    { bucketS, fmt: ms, empty, marks },
  );
  const cal = a.calibration || [];
  if (!cal.length) {
    show($("chart-calibration-upstreams"), empty() || el("div", { class: "empty small", text: "No backend has reported cached tokens yet." }));
  } else {
    show(
      $("chart-calibration-upstreams"),
      barChart({
        id: "calibration_upstreams",
        series: [
          { key: "predicted", label: "predicted", cls: "s-pred" },
          { key: "reported", label: "reported", cls: "s-rep" },
        ],
        groups: cal.map((c) => ({
          label: `${c.upstream} · ${c.model}`,
          attrs: { "data-upstream": c.upstream, "data-model": c.model },
          bars: [
            { key: "predicted", cls: "s-pred", value: c.predicted_cached_tokens },
            { key: "reported", cls: "s-rep", value: c.reported_cached_tokens },
          ],
        })),
        fmt: tokens,
      }),
      el(
        "table",
        { class: "cal-table" },
        el("tr", {}, ["upstream", "model", "requests", "exact", "off > 1 block", "mean |error|"].map((h) => el("th", { text: h }))),
        cal.map((c) =>
          el(
            "tr",
            { "data-upstream": c.upstream, "data-model": c.model },
            [c.upstream, c.model, String(c.requests), pct(c.exact_share), pct(c.off_by_more_than_a_block_share), `${c.mean_abs_error_tokens.toFixed(1)} tok`].map((v) => el("td", { text: v })),
          ),
        ),
      ),
    );
  }
  const o = a.ttfb_by_hit?.overall;
  show(
    $("ttfb-overall"),
    ["hit", "miss"].map((k) =>
      el("span", { class: `ttfb-figure s-${k}`, "data-split": k }, `${k === "hit" ? "hits" : "misses"}: p50 ${ms(o?.[k]?.p50)} · p90 ${ms(o?.[k]?.p90)} · p99 ${ms(o?.[k]?.p99)} (${o?.[k]?.requests ?? 0})`),
    ),
  );
}

function drawTracking(health, analytics) {
  const found = warnings(health, analytics);
  show(
    $("warnings"),
    found.map(([kind, text]) => el("div", { class: "warning", "data-warning": kind, role: "alert" }, text)),
  );
  $("warnings").hidden = !found.length;
  show(
    $("tracking"),
    found.length
      ? el("div", { class: "pill bad", "data-tracking": "warn", text: `${found.length} warning(s): see above` })
      : el("div", { class: "pill ok", "data-tracking": "ok", text: "tracking healthy" }),
    trackingRows(health, analytics),
  );
}

function drawUpstreams(health, analytics) {
  for (const u of health.routing?.upstreams || []) {
    const h = state.loadHistory.get(u.name) || [];
    h.push(u.load.tokens);
    state.loadHistory.set(u.name, h.slice(-LOAD_SAMPLES));
  }
  show($("upstreams"), upstreams(health, analytics, state.loadHistory));
}

function drawTreePanel(tree) {
  const target = $("tree");
  const models = tree.models || [];
  const picker = $("tree-model");
  picker.replaceChildren(...models.map((m) => el("option", { value: m, selected: m === tree.model }, m)));
  picker.hidden = models.length < 2;
  if (!tree.nodes.length) {
    show(target, tree.tokenizer_loading ? el("div", { class: "empty", text: `The tokenizer of ${tree.model} is still loading.` }) : noRequests("prefixes"));
    $("tree-detail").replaceChildren();
    return;
  }
  const { svg, caption, broken } = drawTree(tree, $("tree-detail"));
  const squeezed = broken === null ? "" : ` The spine is drawn shorter than to scale: the axis changes scale at ${broken} tokens (dashed line).`;
  const note = `${tree.model}: ${tree.stats.shown} of ${tree.stats.nodes} nodes shown (most hit), ${tokens(tree.stats.tokens)} tokens held.${squeezed}`;
  show(target, caption, svg, el("p", { class: "note", text: note }));
  if (!$("tree-detail").childElementCount) {
    $("tree-detail").append(el("p", { class: "note", text: "Hover a node for its depth, hits and decoded text." }));
  }
}

// -- the refresh loop -------------------------------------------------------------

async function refresh() {
  const { window, bucket } = range();
  const health = await getJSON("/health", {}, [503]);
  $("status").textContent = health.status;
  $("status").className = `pill ${health.status === "ok" ? "ok" : health.status === "down" ? "bad" : "warn"}`;
  if (!("tracking" in health)) {
    // /health answered its bare liveness: kvern has an admin key this page lacks.
    throw new AuthRequired(adminKey() ? "kvern refused the stored admin key." : "This kvern has an admin key.");
  }
  const [analytics, tree] = await Promise.all([
    getJSON("/analytics", { window, bucket }),
    getJSON("/trie/tree", { max_nodes: 60, model: state.model }).catch((err) => {
      if (err instanceof AuthRequired) throw err;
      return { error: err.message, nodes: [], models: [] };
    }),
  ]);
  drawTracking(health, analytics);
  show($("tiles"), tiles(analytics));
  drawCharts(analytics, bucket);
  drawUpstreams(health, analytics);
  drawMisses($("misses"), analytics);
  if (tree.error) show($("tree"), el("div", { class: "empty", text: `The prefix tree is not available: ${tree.error}` }));
  else drawTreePanel(tree);
  $("updated").textContent = `updated ${clock(Date.now() / 1000)} · kvern ${health.version} · ${analytics.summary.requests} requests in window ${window}`;
  $("forget-key").hidden = !adminKey();
  document.body.dataset.loaded = "true";
}

async function tick() {
  state.running = true;
  try {
    await refresh();
    $("error").hidden = true;
  } catch (err) {
    if (err instanceof AuthRequired) {
      askForKey(err.message);
      state.again = false;
      return; // no refresh until a key is entered
    }
    $("error").hidden = false;
    $("error").textContent = `Could not refresh: ${err.message}. Retrying…`;
  } finally {
    state.running = false;
    state.refreshes += 1;
    document.body.dataset.refreshes = String(state.refreshes);
  }
  state.timer = setTimeout(tick, state.again ? 0 : REFRESH_MS);
  state.again = false;
}

function refreshNow() {
  clearTimeout(state.timer);
  if (state.running) state.again = true; // right after the one in flight
  else tick();
}

setupRange();
setupLogin();
$("tree-model").addEventListener("change", (e) => {
  state.model = e.target.value;
  refreshNow();
});
tick();
