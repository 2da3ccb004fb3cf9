"""Does kvern's memory stay flat once its trie is full? ``python bench/soak.py [--minutes 10]``.

Starts, each in its own process on 127.0.0.1: a fast scripted streaming
upstream (``bench/harness.py``: 20 us of prefill a token, 16-64 chunks 5 ms
apart) and kvern as users run it (``python -m kvern serve --config``) in
front of it, with the real Llama 3 tokenizer and template and SQLite
analytics, its trie capped low (``--trie-tokens``, and the tokenizer's segment
cache to the same number of tokens) so that both fill within the first
minute or two. ``--streams`` clients then chat without pause:
multi-turn streamed conversations whose every turn adds new text, so new
prefixes keep coming and the trie keeps evicting.

Every ``--sample-s`` seconds: the resident memory (RSS) of kvern's relay and
of its brain child (``python -m kvern.tracking.brain``), and the trie's size
against its cap and the locks it holds (``/trie/visualize``). A process whose
memory keeps growing once its trie is full leaks: what the trie holds is
bounded, so what it costs should be too. Once the load has stopped the trie
should hold no lock (a lock left behind pins its path for ever). Printed:
the samples, and the least-squares slope of the summed RSS (MB/min) over the
samples taken after the trie first reached its cap (each process's own slope
too).

Also counted: errors (a non-200 answer, a stream cut before ``data: [DONE]``,
an error event) and rows lost (requests sent less the rows in the analytics
database after a graceful stop). The last line is machine-readable::

    rss_slope_mb_per_min=<x> rows_lost=<y> errors=<z>

``--quick`` is a 2-minute run with a smaller trie, for development;
``--max-turns`` makes chats longer (deeper prefixes), ``--config-json`` lays
more of kvern's config over the bench's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402 - after the path set-up
    MODEL,
    Conversations,
    body_of,
    deep_merge,
    is_brain,
    process_tree,
    rss_mb,
    start_kvern,
    start_server,
    stop,
)

# The trie is "at its cap" once it holds this share of trie.max_tokens: it
# evicts down to 90% whenever an insert takes it past 100% (RadixTrie.maintain).
CAP_SHARE = 0.9


@dataclass(slots=True)
class Sample:
    """One look at kvern's processes and its trie."""

    at_s: float  # since the load started
    relay_mb: float  # RSS of the `python -m kvern serve` process
    brain_mb: float  # RSS of its tracking child (0 when none is running)
    trie_tokens: int | None  # tokens the model's trie holds (None: no answer in time)
    max_tokens: int | None  # the trie's cap
    locks: int | None  # locks held in the trie (requests in flight)
    done: int  # requests answered so far
    errors: int  # of those, failed or cut

    @property
    def total_mb(self) -> float:
        return self.relay_mb + self.brain_mb

    @property
    def full(self) -> bool:
        if self.trie_tokens is None or not self.max_tokens:
            return False
        return self.trie_tokens >= CAP_SHARE * self.max_tokens


@dataclass(slots=True)
class Load:
    """What the clients did."""

    sent: int = 0  # requests started against kvern
    done: int = 0  # requests finished (well or not)
    errors: dict[str, int] = field(default_factory=dict)  # by kind

    @property
    def num_errors(self) -> int:
        return sum(self.errors.values())

    def fail(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


# -- the clients -----------------------------------------------------------------------


async def one_chat(client: Any, url: str, session: dict[str, Any], chunks: int) -> str | None:
    """One streamed turn; None when it ended with ``[DONE]``, else what went wrong."""
    try:
        async with client.stream(
            "POST",
            url + "/v1/chat/completions",
            content=body_of(session, chunks),
            headers={"content-type": "application/json", "x-session-id": session["id"]},
        ) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return f"HTTP {resp.status_code}"
            last = ""
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    last = line
                    if '"error"' in line and line.startswith('data: {"error"'):
                        return "error event"
            return None if last == "data: [DONE]" else "cut stream"
    except Exception as exc:  # noqa: BLE001 - counted as an error by kind
        return type(exc).__name__


async def clients(
    url: str, streams: int, until: float, load: Load, seed: int, max_turns: int
) -> None:
    """``streams`` clients chatting back to back until ``until`` (perf_counter)."""
    import httpx

    chats = Conversations(seed, max_turns=max_turns)
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=streams * 2, max_keepalive_connections=streams * 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def one_stream() -> None:
            while time.perf_counter() < until:
                session = chats.next()
                chunks = rng.randint(16, 64)
                load.sent += 1
                error = await one_chat(client, url, session, chunks)
                load.done += 1
                if error is not None:
                    load.fail(error)
                chats.done(session, chunks)

        await asyncio.gather(*(one_stream() for _ in range(streams)))


# -- the samples -----------------------------------------------------------------------


async def trie_size(client: Any, url: str) -> tuple[int | None, int | None, int | None]:
    """(tokens held, cap, locks held) of the bench model's trie; Nones if kvern did not answer."""
    try:
        resp = await client.get(url + "/trie/visualize", params={"n": 1}, timeout=20)
        stats = resp.json()[MODEL]["stats"]
        return int(stats["tokens"]), int(stats["max_tokens"]), stats.get("locks")
    except Exception:  # noqa: BLE001 - a missed sample, not a failed bench
        return None, None, None


def memory(pid: int) -> tuple[float, float]:
    """RSS (MB) of kvern's relay process and of its brain child."""
    children = process_tree(pid)[1:]
    brains = [c for c in children if is_brain(c)]
    return rss_mb([pid]), rss_mb(brains)


async def sampler(
    url: str, pid: int, every_s: float, start: float, until: float, load: Load
) -> list[Sample]:
    import httpx

    samples: list[Sample] = []
    async with httpx.AsyncClient() as client:
        next_at = start
        while True:
            tokens, cap, locks = await trie_size(client, url)
            relay, brain = memory(pid)
            at = time.perf_counter() - start
            sample = Sample(at, relay, brain, tokens, cap, locks, load.done, load.num_errors)
            samples.append(sample)
            print(row(sample), flush=True)
            now = time.perf_counter()
            while next_at <= now:  # a slow answer skips the slots it overran
                next_at += every_s
            if next_at > until:
                return samples
            await asyncio.sleep(next_at - now)


# -- figures ---------------------------------------------------------------------------


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB a minute (0 for fewer than 2)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (y - mean_y) for t, y in points)
    return cov / var * 60.0


def header() -> str:
    return (
        f"{'t s':>6} {'relay MB':>9} {'brain MB':>9} {'total MB':>9} "
        f"{'trie tokens':>12} {'fill':>6} {'locks':>6} {'done':>7} {'errors':>6}"
    )


def row(s: Sample) -> str:
    fill = f"{s.trie_tokens / s.max_tokens:.0%}" if s.trie_tokens and s.max_tokens else "-"
    tokens = str(s.trie_tokens) if s.trie_tokens is not None else "-"
    locks = str(s.locks) if s.locks is not None else "-"
    return (
        f"{s.at_s:>6.0f} {s.relay_mb:>9.1f} {s.brain_mb:>9.1f} {s.total_mb:>9.1f} "
        f"{tokens:>12} {fill:>6} {locks:>6} {s.done:>7} {s.errors:>6}"
    )


def count_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        (n,) = conn.execute("SELECT COUNT(*) FROM requests").fetchone()
    return int(n)


# -- the run ---------------------------------------------------------------------------


async def soak(
    url: str,
    pid: int,
    *,
    minutes: float,
    streams: int,
    sample_s: float,
    seed: int,
    max_turns: int,
) -> tuple[Load, list[Sample]]:
    load = Load()
    start = time.perf_counter()
    until = start + minutes * 60
    print(header(), flush=True)
    load_task = asyncio.create_task(clients(url, streams, until, load, seed, max_turns))
    samples = await sampler(url, pid, sample_s, start, until, load)
    await load_task  # the turns in flight at the deadline end normally
    return load, samples


async def locks_left(url: str) -> int | None:
    """Locks the trie still holds once every request has ended (a radix backend: 0)."""
    import httpx

    async with httpx.AsyncClient() as client:
        await client.get(url + "/analytics", params={"window": "1h", "wait_s": 30}, timeout=60)
        _, _, locks = await trie_size(client, url)
    return locks


def warm_up(url: str, load: Load) -> None:
    """One turn, so the tokenizer is loaded before the clock starts."""
    import httpx

    body = body_of({"id": "warm", "messages": [{"role": "user", "content": "hi"}]}, 4)
    load.sent += 1
    with httpx.Client(timeout=120) as client:
        resp = client.post(url + "/v1/chat/completions", content=body)
        if resp.status_code != 200:
            load.fail(f"HTTP {resp.status_code}")
    time.sleep(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--minutes", type=float, default=None, help="length of the load")
    parser.add_argument("--streams", type=int, default=32, help="concurrent chats")
    parser.add_argument("--trie-tokens", type=int, default=None, help="trie.max_tokens")
    parser.add_argument(
        "--config-json", default="{}", help="more config laid over the bench's (JSON)"
    )
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--quick", action="store_true", help="2 minutes, smaller trie")
    parser.add_argument("--max-turns", type=int, default=8, help="turns of the longest chats")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--kvern-path", default=str(ROOT), help="checkout kvern runs from")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (db, logs)")
    args = parser.parse_args()
    minutes = args.minutes or (2.0 if args.quick else 10.0)
    trie_tokens = args.trie_tokens or (300_000 if args.quick else 1_000_000)

    # The segment cache is held to the trie's size, so both bounded caches
    # fill in the first minute: what grows after that has no bound.
    sized = {
        "trie": {"max_tokens": trie_tokens},
        "tokenizers": {"incremental_cache_tokens": trie_tokens},
    }
    tmp = Path(tempfile.mkdtemp(prefix="kvern-soak-"))
    procs = []
    load = Load()
    try:
        up_proc, upstream = start_server(
            "upstream", [], "up", prefill_us_per_token=20, decode_ms_per_chunk=5
        )
        procs.append(up_proc)
        kvern_proc, url = start_kvern(
            [upstream],
            tmp,
            Path(args.kvern_path),
            "soak",
            extra=deep_merge(sized, json.loads(args.config_json)),
        )
        procs.append(kvern_proc)
        warm_up(url, load)
        print(
            f"soak: {args.streams} streams for {minutes:g} min, trie.max_tokens="
            f"{trie_tokens} (and tokenizers.incremental_cache_tokens), "
            f"kvern pid {kvern_proc.pid}, work folder {tmp}",
            flush=True,
        )
        ran, samples = asyncio.run(
            soak(
                url,
                kvern_proc.pid,
                minutes=minutes,
                streams=args.streams,
                sample_s=args.sample_s,
                seed=args.seed,
                max_turns=args.max_turns,
            )
        )
        locks = asyncio.run(locks_left(url))
        load.sent += ran.sent
        load.done += ran.done
        for kind, n in ran.errors.items():
            load.errors[kind] = load.errors.get(kind, 0) + n
        stop([kvern_proc], timeout_s=120)  # graceful: every row is written
        rows = count_rows(tmp / "soak.db")
    finally:
        stop(procs)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    report(samples, load, rows, kvern_proc.returncode, locks)


def report(
    samples: list[Sample], load: Load, rows: int, exit_code: int | None, locks: int | None
) -> None:
    full_at = next((i for i, s in enumerate(samples) if s.full), None)
    after = samples[full_at:] if full_at is not None else []
    total = slope_per_min([(s.at_s, s.total_mb) for s in after])
    relay = slope_per_min([(s.at_s, s.relay_mb) for s in after])
    brain = slope_per_min([(s.at_s, s.brain_mb) for s in after])
    first, last = samples[0], samples[-1]
    print()
    if full_at is None:
        print("the trie never reached its cap: no slope (raise --minutes or lower --trie-tokens)")
    else:
        cap = samples[full_at]
        print(
            f"trie at its cap from {cap.at_s:.0f} s ({cap.total_mb:.1f} MB); "
            f"{len(after)} samples after"
        )
    print(
        f"RSS total {first.total_mb:.1f} -> {last.total_mb:.1f} MB; slope after the cap "
        f"{total:+.2f} MB/min (relay {relay:+.2f}, brain {brain:+.2f})"
    )
    minutes = last.at_s / 60 if last.at_s > 0 else 1
    print(
        f"requests sent {load.sent} ({load.done / minutes:.0f}/min), rows {rows}, "
        f"kvern exit code {exit_code}, errors {json.dumps(load.errors)}, "
        f"trie locks left after the load {locks if locks is not None else '-'}"
    )
    slope = f"{total:.2f}" if full_at is not None else "nan"
    print(f"rss_slope_mb_per_min={slope} rows_lost={load.sent - rows} errors={load.num_errors}")


if __name__ == "__main__":
    main()
