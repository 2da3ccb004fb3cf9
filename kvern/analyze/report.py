"""The analysis as one JSON object (``--json``); the text tables are drawn from it too.

Keys (stable; new keys may be added, none renamed)::

    version            1
    log                the file analysed
    requests           requests read (lines that were one)
    bad_lines          {count, lines: [{line, error}]}   (the first 50 listed)
    settings           {model, tokenizer, block_size, capacity_tokens, kv_bytes_per_token,
                        rules: {model glob: [rule]}}       (the flags and rules in force)
    models             [{model, block_size, tokenizer: {kind, source, error},
                         template_errors, first_template_error}]
    totals             a tally (below), the whole log
    groups             [tally + {model, tenant}], most prompt tokens first
    sites              {count, untracked_requests, untracked_tokens, top: [site]}
    what_if            {ran, rules: [what-if + {rule, model, sites, yaml}], all: what-if | null}
                       (ran: false with --no-what-if or no rule to try; rules is then [])
    capacity           {kv_bytes_per_token, models: [curve + {model}],
                        tenants: [curve + {model, tenant}]}
    elapsed_s          seconds the analysis took

A tally: ``requests, prompt_tokens, reusable_any_tokens`` (shared with any
earlier prompt), ``reusable_tokens`` (the same in whole blocks),
``reused_tokens`` (what the cache reused: ``reusable_tokens`` unless
``--capacity-tokens``), ``lost_tokens`` (prompt - reused), ``reasons: {cold,
below_block, diverged, novel, evicted, routed_away, unreported: {requests,
tokens}}`` and ``adds_up`` (reused + every reason's tokens == prompt).

A site: ``rank, model, tenant, prefix_id, place, place_kind, requests,
tokens_lost, first_line, last_line, at_tokens`` (where its requests parted),
``examples: [{before, ours, theirs, ours_marked, theirs_marked}]`` (two,
the differing span in brackets) and ``advice``: :meth:`Advice.to_dict`
(``rule`` as config.yaml takes it, ``kind``, ``varying``, ``measured`` -- the
replay over the site's prompts -- ``rejected``, ``note``) plus ``yaml``, the
rule as a config.yaml snippet ready to paste (null without a rule).

A what-if: ``before`` and ``after`` ({requests, prompt_tokens,
reusable_tokens, reused_tokens, diverged_tokens}), ``saved_tokens`` (reused
after - before), ``recovered_share`` (1 - diverged after / before) and
``by_group``: the same per (model, tenant) whose figures moved.

A curve: ``block_size, total_tokens, distinct_blocks, points: [{capacity_tokens,
capacity_blocks, reused_tokens, reuse_share, gib, exact}]``: the token reuse an
LRU prefix cache of each size would reach (:mod:`kvern.diagnosis.capacity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import yaml

from kvern.analyze.analysis import Analysis, SiteAdvice
from kvern.analyze.tally import Tally
from kvern.analyze.whatif import compare
from kvern.diagnosis.capacity import StackDistanceCurve
from kvern.diagnosis.rules import marked

VERSION: Final[int] = 1
# Examples shown per site, side by side.
SHOWN_EXAMPLES: Final[int] = 2


def rule_yaml(model: str, rule: dict[str, str]) -> str:
    """The rule as a config.yaml ``normalization:`` snippet (valid YAML, quoted as needed)."""
    return yaml.safe_dump(
        {"normalization": {model: [rule]}}, sort_keys=False, allow_unicode=True, width=10_000
    )


def tally_dict(t: Tally, **keys: str) -> dict[str, Any]:
    return {**keys, **t.to_dict()}


def site_dict(s: SiteAdvice) -> dict[str, Any]:
    site = s.site
    examples = []
    for ex in site.examples[:SHOWN_EXAMPLES]:
        ours, theirs = marked(ex)
        examples.append(
            {
                "before": ex.before,
                "ours": ex.ours,
                "theirs": ex.theirs,
                "ours_marked": ours,
                "theirs_marked": theirs,
            }
        )
    advice = s.advice.to_dict()
    rule = advice.get("rule")
    advice["yaml"] = rule_yaml(site.model, rule) if rule else None
    return {
        "rank": s.rank,
        "model": site.model,
        "tenant": site.tenant,
        "prefix_id": site.prefix_id,
        "place": site.place,
        "place_kind": site.place_kind,
        "requests": site.requests,
        "tokens_lost": site.tokens_lost,
        "first_line": site.first_line,
        "last_line": site.last_line,
        "at_tokens": sorted(site.at_tokens),
        "examples": examples,
        "advice": advice,
    }


def curve_dict(curve: StackDistanceCurve, **keys: str) -> dict[str, Any]:
    return {
        **keys,
        "block_size": curve.block_size,
        "total_tokens": curve.total_tokens,
        "distinct_blocks": curve.distinct_blocks,
        "points": [p.to_dict() for p in curve.curve()],
    }


def _what_if(a: Analysis) -> dict[str, Any]:
    rules = []
    # Without the passes (--no-what-if) there is nothing to show per rule.
    for c, result in zip(a.candidates if a.per_rule else [], a.per_rule, strict=True):
        rule = {
            "pattern": c.rule.pattern,
            "replacement": c.rule.replacement,
            "scope": c.rule.scope,
        }
        rules.append(
            {
                "model": c.model,
                "rule": rule,
                "sites": list(c.sites),
                "yaml": rule_yaml(c.model, rule),
                **compare(a.base, result),
            }
        )
    together = compare(a.base, a.together) if a.together is not None else None
    return {"ran": bool(a.per_rule), "rules": rules, "all": together}


def _groups(a: Analysis) -> list[dict[str, Any]]:
    ordered = sorted(a.base.groups.items(), key=lambda kv: (-kv[1].prompt_tokens, kv[0]))
    return [tally_dict(t, model=m, tenant=tenant) for (m, tenant), t in ordered]


def _models(a: Analysis) -> list[dict[str, Any]]:
    states = {s["model"]: s for s in a.setup.tokenizer_states()}
    out = []
    for model, state in sorted(a.base.models.items()):
        tok = states.get(model, {"kind": state.tokenizer.kind, "source": None, "error": None})
        out.append(
            {
                "model": model,
                "block_size": state.block_size,
                "tokenizer": {k: tok.get(k) for k in ("kind", "source", "error")},
                "template_errors": state.template_errors,
                "first_template_error": state.first_template_error,
            }
        )
    return out


def _rules(a: Analysis) -> dict[str, list[dict[str, Any]]]:
    return {
        pattern: [r.model_dump() for r in entries] for pattern, entries in a.setup.rules.items()
    }


def build(a: Analysis) -> dict[str, Any]:
    """The report of ``a`` as one JSON-ready object (see the module docstring)."""
    o = a.setup.options
    sites = a.base.sites
    assert sites is not None
    curves: Sequence[tuple[str, StackDistanceCurve]] = [
        (m, s.curve) for m, s in sorted(a.base.models.items()) if s.curve is not None
    ]
    return {
        "version": VERSION,
        "log": str(a.log.path),
        "requests": a.base.totals.requests,
        "bad_lines": a.base.bad.to_dict(),
        "settings": {
            "model": o.model,
            "tokenizer": o.tokenizer,
            "block_size": o.block_size,
            "capacity_tokens": o.capacity_tokens,
            "kv_bytes_per_token": o.kv_bytes_per_token,
            "rules": _rules(a),
        },
        "models": _models(a),
        "totals": a.base.totals.to_dict(),
        "groups": _groups(a),
        "sites": {
            "count": len(sites.sites),
            "untracked_requests": sites.untracked_requests,
            "untracked_tokens": sites.untracked_tokens,
            "top": [site_dict(s) for s in a.sites],
        },
        "what_if": _what_if(a),
        "capacity": {
            "kv_bytes_per_token": o.kv_bytes_per_token,
            "models": [curve_dict(c, model=m) for m, c in curves],
            "tenants": [
                curve_dict(c, model=m, tenant=t)
                for (m, t), c in sorted(a.base.tenant_curves.items())
            ],
        },
        "elapsed_s": round(a.elapsed_s, 3),
    }
