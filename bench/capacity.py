"""How much load kvern tracks, and what it costs streams: ``python bench/capacity.py [--quick]``.

Starts, each in its own process on 127.0.0.1: two upstreams that wait a
prefill time proportional to the prompt (190 us a token, 0.3-1.5 s for these
prompts) and then stream 16-64 chunks (15 ms apart); the thin pass-through of
``bench/proxy_overhead.py`` (Starlette + httpx, no tracking); kvern
(``python -m kvern``) in front of the first upstream; and kvern routing
cache-aware over both ("routed"), each with the real Llama 3 tokenizer and
template and SQLite analytics. An open-loop Poisson load generator (its own
process) sends multi-turn chats of 1-8k tokens (tenants share system
prompts) at each offered rate, the same schedule four ways -- directly to
the first upstream, through the thin pass-through, through kvern and through
routed kvern -- interleaved in rounds so machine noise hits all alike.

Per step: kvern's tracked and skipped share; added time to first byte
(p50/p99 of each request's time to first byte less the upstream's own
prefill wait, which depends on the prompt, over direct's) for thin and kvern;
the largest gap between two chunks of any stream, over direct's largest
(stall); routing decisions that missed their deadline; kvern's CPU
milliseconds per request and RSS (relay and brain). Then a "big text" step:
32 normal streams beside one 50 MB answer and one 4 MB prompt, the normal
streams' worst added stall.

``--kvern-path DIR`` runs kvern from another checkout (for before/after
figures of one bench). The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402 - after the path set-up
    Conversations,
    body_of,
    cpu_s,
    get_json,
    process_tree,
    rss_mb,
    start_kvern,
)
from bench.harness import start_server as start_server_with  # noqa: E402
from bench.harness import stop as stop_processes  # noqa: E402

PREFILL_S_PER_TOKEN = 190e-6
PREFILL_MAX_TOKENS = 8192  # the upstream's prefill delay stops growing here
DECODE_S_PER_CHUNK = 0.015
BIG_ANSWER_BYTES = 50 * 1024 * 1024
BIG_PROMPT_BYTES = 4 * 1024 * 1024


# -- servers (each in its own process; see bench/harness.py) --------------------------


def start_server(kind: str, upstreams: list[str], name: str = "") -> tuple[Any, str]:
    """The scripted upstream with this bench's prefill and decode times, or the thin proxy."""
    return start_server_with(
        kind,
        upstreams,
        name,
        prefill_us_per_token=PREFILL_S_PER_TOKEN * 1e6,
        prefill_max_tokens=PREFILL_MAX_TOKENS,
        decode_ms_per_chunk=DECODE_S_PER_CHUNK * 1e3,
    )


# -- the load -----------------------------------------------------------------------


def expected_prefill_ms(body: bytes) -> float:
    """The upstream's own wait before its first chunk (see :func:`bench.harness.upstream_app`)."""
    messages = json.loads(body).get("messages", [])
    tokens = sum(len(m.get("content") or "") for m in messages) // 4
    return min(tokens, PREFILL_MAX_TOKENS) * PREFILL_S_PER_TOKEN * 1000


async def one_request(client: Any, url: str, session: str, body: bytes) -> dict[str, Any]:
    """One streamed chat: time to first byte beyond the upstream's own prefill, largest gap."""
    expected_ms = expected_prefill_ms(body)
    t0 = time.perf_counter()
    first: float | None = None
    last: float | None = None
    max_gap = 0.0
    gap_at = 0.0
    status = 0
    error = None
    try:
        async with client.stream(
            "POST",
            url + "/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json", "x-session-id": session},
        ) as resp:
            status = resp.status_code
            async for _ in resp.aiter_raw():
                now = time.perf_counter()
                if first is None:
                    first = now
                elif last is not None and now - last > max_gap:
                    max_gap, gap_at = now - last, now
                last = now
    except Exception as exc:  # noqa: BLE001 - counted as an error
        error = type(exc).__name__
    end = time.perf_counter()
    return {
        "ttfb_ms": ((first or end) - t0) * 1000 - expected_ms,
        "gap_ms": max_gap * 1000,
        "gap_at": gap_at,  # when the largest gap ended (perf_counter: one clock per machine)
        "ok": error is None and status == 200,
        "error": error or (None if status == 200 else f"HTTP {status}"),
    }


async def open_loop(url: str, rate: float, duration_s: float, seed: int) -> list[dict[str, Any]]:
    """Poisson arrivals at ``rate`` for ``duration_s``; each request is a session's next turn."""
    import httpx

    rng = random.Random(seed * 7919 + int(rate * 10))
    chats = Conversations(seed)
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    results: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        tasks: list[asyncio.Task[None]] = []

        async def send(session: dict[str, Any], chunks: int) -> None:
            result = await one_request(client, url, session["id"], body_of(session, chunks))
            results.append(result)
            chats.done(session, chunks)

        start = time.perf_counter()
        at = 0.0
        while True:
            at += rng.expovariate(rate)
            if at >= duration_s:
                break
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            chunks = rng.randint(16, 64)
            tasks.append(asyncio.create_task(send(chats.next(), chunks)))
        await asyncio.gather(*tasks)
    return results


async def big_text(url: str, seed: int) -> list[dict[str, Any]]:
    """32 normal streams, and beside them one 50 MB answer and one 4 MB prompt."""
    import httpx

    chats = Conversations(seed + 1)
    limits = httpx.Limits(max_connections=256)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        big_answer = chats.next()
        big_prompt = chats.next()
        big_prompt["messages"][-1]["content"] = "lorem ipsum dolor " * (BIG_PROMPT_BYTES // 18)
        specials = [
            one_request(
                client,
                url,
                big_answer["id"],
                body_of(big_answer, 1, metadata={"bench_answer_bytes": BIG_ANSWER_BYTES}),
            ),
            one_request(client, url, big_prompt["id"], body_of(big_prompt, 16)),
        ]

        async def normal(i: int) -> dict[str, Any]:
            await asyncio.sleep(0.05 * i)
            session = chats.next()
            return await one_request(client, url, session["id"], body_of(session, 64))

        normals = [normal(i) for i in range(32)]
        out = await asyncio.gather(*normals, *specials)
    return [{**r, "normal": i < 32} for i, r in enumerate(out)]


def loadgen_main(args: argparse.Namespace) -> None:
    if args.big:
        results = asyncio.run(big_text(args.target, args.seed))
    else:
        results = asyncio.run(open_loop(args.target, args.rate, args.duration, args.seed))
    json.dump(results, sys.stdout)


def run_loadgen(
    url: str, *, rate: float, duration: float, seed: int, big: bool = False
) -> list[dict[str, Any]]:
    """Run the load generator in its own process against ``url``; its per-request results."""
    cmd = [
        sys.executable,
        __file__,
        "--loadgen",
        "--target",
        url,
        "--rate",
        str(rate),
        "--duration",
        str(duration),
        "--seed",
        str(seed),
    ]
    if big:
        cmd.append("--big")
    out = subprocess.run(cmd, check=True, capture_output=True, timeout=duration + 900)
    results: list[dict[str, Any]] = json.loads(out.stdout)
    return results


# -- kvern's own figures ----------------------------------------------------------------


def tracking_counts(kvern: str) -> dict[str, float]:
    get_json(kvern + "/analytics?window=1h&wait_s=110", timeout_s=120)  # lets queued tracking land
    health = get_json(kvern + "/health")
    t = health.get("tracking", {})
    skipped = t.get("skipped_backlog", 0) + t.get("skipped_brain_down", 0)
    skipped += sum((t.get("skipped") or {}).values())
    routing = health.get("routing") or {}
    return {
        "tracked": t.get("tracked", 0),
        "skipped": skipped,
        "timeouts": routing.get("decision_timeouts", 0),
    }


# -- the table ----------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter steps (< 2 min)")
    parser.add_argument("--steps", default=None, help="offered rates, e.g. 5,10,20,40,80")
    parser.add_argument("--step-s", type=float, default=None, help="seconds per step and way")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per step")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--kvern-path", default=str(ROOT), help="checkout kvern runs from")
    parser.add_argument("--no-big", action="store_true", help="skip the big-text step")
    # internal: the load generator's own process
    parser.add_argument("--loadgen", action="store_true")
    parser.add_argument("--target", default="")
    parser.add_argument("--rate", type=float, default=0)
    parser.add_argument("--duration", type=float, default=0)
    parser.add_argument("--big", action="store_true")
    args = parser.parse_args()
    if args.loadgen:
        loadgen_main(args)
        return

    steps = [
        float(s) for s in (args.steps or ("5,20,40" if args.quick else "5,10,20,40,80")).split(",")
    ]
    step_s = args.step_s or (6.0 if args.quick else 20.0)
    rounds = args.rounds or (1 if args.quick else 2)
    procs: list[Any] = []
    tmp = Path(tempfile.mkdtemp(prefix="kvern-capacity-"))
    try:
        ups = []
        for i in range(2):
            proc, url = start_server("upstream", [], f"u{i}")
            procs.append(proc)
            ups.append(url)
        thin_proc, thin = start_server("thin", ups[:1])
        procs.append(thin_proc)
        kvern_path = Path(args.kvern_path)
        kvern_proc, kvern = start_kvern(ups[:1], tmp, kvern_path, "kvern")
        routed_proc, routed = start_kvern(ups, tmp, kvern_path, "routed")
        procs += [kvern_proc, routed_proc]
        kverns = {"kvern": (kvern_proc, kvern), "routed": (routed_proc, routed)}
        for _, url in kverns.values():  # the tokenizer loads on the first request
            run_loadgen(url, rate=2, duration=3, seed=args.seed + 99)
        time.sleep(2)
        # direct, thin and kvern use one upstream; "routed" is kvern routing
        # cache-aware over both (same prefill and decode times: no queueing).
        arms = {"direct": ups[0], "thin": thin, "kvern": kvern, "routed": routed}
        rows = []
        for rate in steps:
            per: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
            before = {k: tracking_counts(url) for k, (_, url) in kverns.items()}
            cpu0 = {k: cpu_s(process_tree(proc.pid)) for k, (proc, _) in kverns.items()}
            for r in range(rounds):
                for name, target in arms.items():
                    per[name] += run_loadgen(target, rate=rate, duration=step_s, seed=args.seed + r)
            kv: dict[str, dict[str, float]] = {}
            for k, (proc, url) in kverns.items():
                after = tracking_counts(url)
                tree = process_tree(proc.pid)
                sent = len(per[k])
                kv[k] = {
                    "tracked": (after["tracked"] - before[k]["tracked"]) / sent,
                    "skipped": (after["skipped"] - before[k]["skipped"]) / sent,
                    "late": (after["timeouts"] - before[k]["timeouts"]) / sent,
                    "cpu_ms": 1000 * (cpu_s(tree) - cpu0[k]) / sent,
                    "rss_mb": rss_mb(tree),
                }
            rows.append(summarize(rate, per, kv))
            print_row(rows[-1], header=len(rows) == 1)
        big_row = None
        if not args.no_big:
            per_big = {
                name: run_loadgen(target, rate=0, duration=0, seed=args.seed, big=True)
                for name, target in arms.items()
                if name != "routed"
            }
            big_row = summarize_big(per_big)
            print(
                f"big text: 32 normal streams beside a 50 MB answer and a 4 MB prompt -- worst "
                f"gap direct {big_row['direct_gap']:.0f} ms, thin {big_row['thin_gap']:.0f} ms, "
                f"kvern {big_row['kvern_gap']:.0f} ms; added by kvern {big_row['kvern_added']:.0f} "
                f"ms; errors {big_row['errors']}"
            )
        at40 = next((r for r in rows if r["rate"] == 40), rows[-1])
        stall = max(max(r["kvern_stall_added"], r["routed_stall_added"]) for r in rows)
        tracked = min(at40["kvern"]["tracked"], at40["routed"]["tracked"])
        print(
            f"tracked_share_at_40rps={tracked:.4f} "
            f"max_added_stall_ms={stall:.1f} "
            f"added_ttfb_p50_ratio_at_40rps={at40['ttfb_ratio']:.2f} "
            f"big_text_stall_ms={(big_row or {}).get('kvern_added', float('nan')):.1f}"
        )
    finally:
        stop_processes(procs)


def summarize(
    rate: float, per: dict[str, list[dict[str, Any]]], kv: dict[str, dict[str, float]]
) -> dict[str, Any]:
    def ttfb(name: str, q: float) -> float:
        return pct([r["ttfb_ms"] for r in per[name] if r["ok"]], q)

    def stall(name: str) -> float:
        return max((r["gap_ms"] for r in per[name] if r["ok"]), default=0.0)

    out: dict[str, Any] = {
        "rate": rate,
        "requests": len(per["kvern"]),
        "errors": {n: sum(1 for r in rs if not r["ok"]) for n, rs in per.items()},
        **kv,
    }
    for name in ("thin", "kvern", "routed"):
        out[f"{name}_p50"] = ttfb(name, 0.5) - ttfb("direct", 0.5)
        out[f"{name}_p99"] = ttfb(name, 0.99) - ttfb("direct", 0.99)
        out[f"{name}_stall_added"] = stall(name) - stall("direct")
    thin = out["thin_p50"]
    out["ttfb_ratio"] = out["kvern_p50"] / thin if thin > 0 else math.nan
    return out


def summarize_big(per: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def gap(name: str) -> float:
        return max((r["gap_ms"] for r in per[name] if r["normal"] and r["ok"]), default=0.0)

    return {
        "direct_gap": gap("direct"),
        "thin_gap": gap("thin"),
        "kvern_gap": gap("kvern"),
        "kvern_added": gap("kvern") - gap("direct"),
        "errors": {n: sum(1 for r in rs if not r["ok"]) for n, rs in per.items()},
    }


def print_row(row: dict[str, Any], *, header: bool) -> None:
    """One step: kvern (one upstream) and routed (cache-aware over two) beside thin."""
    if header:
        print(
            "added over direct: time to first byte p50/p99 and largest chunk gap (stall), ms; "
            "late = routing answers past the deadline"
        )
        print(
            f"{'req/s':>5} {'reqs':>5} | {'thin p50/p99':>13} {'stall':>6} | "
            f"{'kvern tracked':>13} {'skip':>5} {'p50/p99':>13} {'z':>5} {'stall':>6} "
            f"{'cpu ms':>6} {'MB':>4} | {'routed tracked':>14} {'p50/p99':>13} {'stall':>6} "
            f"{'late':>6} {'cpu ms':>6} | errors d/t/k/r"
        )
    k, r = row["kvern"], row["routed"]
    errors = "/".join(str(row["errors"][n]) for n in ("direct", "thin", "kvern", "routed"))
    print(
        f"{row['rate']:>5.0f} {row['requests']:>5d} | "
        f"{row['thin_p50']:>6.1f}/{row['thin_p99']:<6.1f} {row['thin_stall_added']:>6.1f} | "
        f"{k['tracked']:>13.3f} {k['skipped']:>5.3f} "
        f"{row['kvern_p50']:>6.1f}/{row['kvern_p99']:<6.1f} {row['ttfb_ratio']:>5.2f} "
        f"{row['kvern_stall_added']:>6.1f} {k['cpu_ms']:>6.2f} {k['rss_mb']:>4.0f} | "
        f"{r['tracked']:>14.3f} {row['routed_p50']:>6.1f}/{row['routed_p99']:<6.1f} "
        f"{row['routed_stall_added']:>6.1f} {r['late']:>6.3f} {r['cpu_ms']:>6.2f} | {errors}",
        flush=True,
    )


if __name__ == "__main__":
    main()
