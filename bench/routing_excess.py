"""Where a routing row's prefill went over the bound: ``python bench/routing_excess.py DIR NAME``.

``DIR`` is a ``bench/routing.py --logs DIR`` folder and ``NAME`` one of its
contenders (``kvern_cache_aware``, ``sglang_sglang``, ...); pass the run's
``--seed`` (and ``--sessions`` when it was given). For every request the
replicas answered, the tokens it computed (prompt minus reported cached)
against what the bound's one unlimited cache computes for it, in the order
sessions start: the difference is what routing cost it. Summed by kvern's
route reason (from ``NAME.db``; ``-`` for a router that is not kvern) and by
first turn or later, with ``--top K`` the costliest requests in time order.

Why: a hit rate a few tenths of a point under another router's is a few
thousand tokens; this says which decisions they came from (a tenant's
second session computing the system prompt beside its first, a hot prefix
copied, a session moved off its holder, an evicted prefix computed again).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.routing_trace import (  # noqa: E402
    FleetSpec,
    TraceSpec,
    bound_per_request,
    make_trace,
)
from tests.replica_main import ChatTokenizer  # noqa: E402


def route_reasons(db: Path) -> dict[str, str]:
    """kvern's request id -> its route reason; empty when there is no kvern database."""
    if not db.exists():
        return {}
    with sqlite3.connect(db) as conn:
        return {rid: reason or "-" for rid, reason in conn.execute(
            "SELECT request_id, route_reason FROM requests"
        )}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("logs", type=Path)
    parser.add_argument("name")
    parser.add_argument("--seed", type=int, default=TraceSpec().seed)
    parser.add_argument("--sessions", type=int, default=0)
    parser.add_argument("--top", type=int, default=10, help="the costliest requests shown")
    args = parser.parse_args()
    from tests.assets import tokenizer_fixture

    spec = TraceSpec(seed=args.seed)
    if args.sessions:
        spec = replace(spec, num_sessions=args.sessions)
    trace = make_trace(spec)
    tokenize = ChatTokenizer.from_directory(tokenizer_fixture("qwen2").directory)
    bound = bound_per_request(trace, tokenize, FleetSpec().block_size)
    reasons = route_reasons(args.logs / f"{args.name}.db")
    by_kind: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    costly: list[tuple[float, int, str]] = []
    total = 0
    with (args.logs / f"{args.name}.requests.jsonl").open(encoding="utf-8") as rows:
        for line in rows:
            r = json.loads(line)
            if not r["ok"]:
                continue
            over = r["prompt_tokens"] - r["cached_tokens"] - bound[(r["session_id"], r["turn"])]
            reason = reasons.get(r["request_id"] or "", "-")
            kind = (reason, "first turn" if r["turn"] == 0 else "later turn")
            by_kind[kind][0] += over
            by_kind[kind][1] += over >= FleetSpec().block_size
            total += over
            costly.append((
                r["sent_s"], over,
                f"tenant {r['tenant']} session {r['session_id']} turn {r['turn']} "
                f"on {r['upstream']} ({reason})",
            ))  # fmt: skip
    print(f"{args.name}: {total:,} prefill tokens over the bound")
    for (reason, turn), (over, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"  {reason:>26} {turn:>10}: {over:>7,} tokens, {n} requests over by a block or more")
    top = sorted(costly, key=lambda c: -c[1])[: args.top]
    for sent_s, over, what in sorted(top):
        print(f"    {sent_s:7.2f} s  {over:>6,} over  {what}")


if __name__ == "__main__":
    main()
