// "Why it missed": where the prompt tokens not reused went, and the costliest
// divergence sites with the rule kvern suggests for each (from /analytics'
// miss_reasons and misses). Prompt text is user data: only ever textContent.

import { barChart } from "./charts.js";
import { el, noRequests } from "./dom.js";
import { count, pct, tokens } from "./format.js";

const REASON_TEXT = {
  cold: "cold: nothing earlier shared even its start",
  below_block: "below_block: shared less than one KV block",
  diverged: "diverged: parted from an earlier prompt",
  evicted: "evicted: the backend no longer held it",
  routed_away: "routed_away: another upstream held more",
  unreported: "unreported: the backend gave no figure",
};

// "…Session id: [3f2a…]. Be kind" with the bracketed span marked.
function markedText(text) {
  const open = text.indexOf("[");
  const close = text.indexOf("]", open + 1);
  if (open < 0 || close < 0) return el("span", { class: "detail-text", text });
  return el(
    "span",
    { class: "detail-text" },
    text.slice(0, open),
    el("mark", { text: text.slice(open + 1, close) || "∅" }),
    text.slice(close + 1),
  );
}

function yamlRule(rule) {
  const q = (s) => `'${String(s).replaceAll("'", "''")}'`;
  return `- pattern: ${q(rule.pattern)}\n  replacement: ${q(rule.replacement)}\n  scope: ${rule.scope}`;
}

function advice(site) {
  const a = site.advice || {};
  const m = a.measured;
  const measured = m
    ? `replayed over ${count(m.requests)} recent prompts: ${tokens(m.saved_tokens)} more tokens reused` +
      (m.recovered_share === null ? "" : `, ${pct(m.recovered_share)} of the tokens lost here recovered`)
    : "";
  if (!a.rule) {
    return el("div", { class: "advice", "data-rule": "none" }, el("p", { class: "note", text: a.note || "no rule suggested" }), measured ? el("p", { class: "note", text: measured }) : null);
  }
  return el(
    "div",
    { class: "advice", "data-rule": a.kind },
    el("p", { class: "note", text: `Suggested rule (${a.kind}; add under normalization: in config.yaml):` }),
    el("pre", { class: "detail-text rule", "data-pattern": a.rule.pattern, text: yamlRule(a.rule) }),
    measured ? el("p", { class: "note", text: measured }) : null,
    a.note ? el("p", { class: "note", text: a.note }) : null,
  );
}

function siteCard(site) {
  const at = Array.isArray(site.at_token) ? `tokens ${site.at_token[0]}–${site.at_token[1]}` : `token ${site.at_token}`;
  return el(
    "div",
    { class: "site", "data-site": site.site, "data-place": site.place, "data-tokens": site.tokens_lost, "data-requests": site.requests },
    el("div", { class: "up-head" }, el("b", { text: `${site.place}` }), el("span", { class: "muted", text: `${site.model}${site.tenant ? ` · tenant ${site.tenant.slice(0, 8)}` : ""} · at ${at}` })),
    el("div", { class: "kv" }, el("span", { text: "requests · tokens lost" }), el("b", { text: `${count(site.requests)} · ${tokens(site.tokens_lost)}` })),
    (site.examples || []).map((e) =>
      el("div", { class: "pair" }, el("div", {}, el("span", { class: "muted", text: "this request" }), markedText(e.ours_marked ?? e.ours)), el("div", {}, el("span", { class: "muted", text: "the earlier prompt" }), markedText(e.theirs_marked ?? e.theirs))),
    ),
    advice(site),
  );
}

export function drawMisses(container, analytics) {
  const r = analytics.miss_reasons;
  if (!r || !r.requests) {
    container.replaceChildren(noRequests("tokenized requests"));
    return;
  }
  const reasons = Object.entries(r.reasons).filter(([, v]) => v.tokens > 0);
  const groups = [
    { label: "reused", attrs: { "data-reason": "reused" }, bars: [{ key: "tokens", cls: "s-hit", value: r.reused_tokens }] },
    { label: "novel (nothing to fix)", attrs: { "data-reason": "novel" }, bars: [{ key: "tokens", cls: "s-rep", value: r.novel_tokens }] },
    ...reasons.map(([k, v]) => ({ label: k, attrs: { "data-reason": k }, bars: [{ key: "tokens", cls: "s-miss", value: v.tokens }] })),
  ];
  const legend = el(
    "ul",
    { class: "note reasons" },
    reasons.map(([k, v]) => el("li", { "data-reason": k, text: `${REASON_TEXT[k] || k}: ${count(v.requests)} requests, ${tokens(v.tokens)} tokens` })),
  );
  const total = el("p", { class: "note", "data-adds-up": String(r.adds_up), text: `${tokens(r.prompt_tokens)} prompt tokens over ${count(r.requests)} requests: ${pct(r.reused_tokens / r.prompt_tokens)} reused.` });
  const sites = analytics.misses || [];
  container.replaceChildren(
    total,
    barChart({ id: "miss_reasons", series: [{ key: "tokens", label: "tokens", cls: "s-miss" }], groups, fmt: tokens }),
    legend,
    el("h3", { text: sites.length ? "Where prompts diverged, costliest first" : "No divergences in this window" }),
    el("div", { class: "sites" }, sites.map(siteCard)),
  );
}
