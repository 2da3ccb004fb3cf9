"""The capacity curve, one pass against brute force: ``python bench/capacity_curve.py [--quick]``.

A seeded multi-tenant chat trace (20,000 requests; ``--quick``: 2,000):
system prompts of 200-2,000 tokens picked by Zipf popularity, sessions of
1-12 turns each re-sending the whole conversation, one-off prompts in
between. Its prompts are cut into 16-token blocks once (``hash_s``); then
:class:`~kvern.diagnosis.capacity.StackDistanceCurve` computes the curve at
every default capacity (powers of two up to all distinct blocks) in one pass
(``mattson_s``), and :func:`~kvern.diagnosis.lru_reference.simulate_lru_blocks`
simulates an LRU prefix cache at each of those capacities, one pass each
(``brute_s``). Both are timed from the same block ids, so the hashing, the
same for both, is left out of the ratio. ``max_abs_error`` is the largest
difference of reuse share between the two over the capacities (the method
is exact: it should be 0). A bounded run (``max_blocks`` a quarter of the
distinct blocks) is checked against the same brute force below its bound.

The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from kvern.diagnosis.capacity import (  # noqa: E402 - after the sys.path set-up above
    StackDistanceCurve,
    block_ids,
    format_curve,
)
from kvern.diagnosis.lru_reference import simulate_lru_blocks  # noqa: E402

SEED = 20240611
BLOCK_SIZE = 16
VOCAB = 128_000
# Llama-3.1-8B in bf16: 2 * 32 layers * 8 KV heads * 128 * 2 bytes.
KV_BYTES_PER_TOKEN = 131_072


def make_trace(num_requests: int, seed: int = SEED) -> list[list[int]]:
    """Prompts in arrival order: interleaved chat sessions over shared system prompts."""
    rng = random.Random(seed)

    def tokens(lo: int, hi: int) -> list[int]:
        return rng.choices(range(VOCAB), k=rng.randint(lo, hi))

    systems = [tokens(200, 2000) for _ in range(40)]
    weights = [1.0 / (rank + 1) for rank in range(len(systems))]
    live: list[tuple[list[int], int]] = []  # (conversation so far, turns left)
    out: list[list[int]] = []
    while len(out) < num_requests:
        if not live or (len(live) < 64 and rng.random() < 0.3):
            system = rng.choices(systems, weights=weights)[0]
            live.append((list(system), rng.randint(1, 12)))
        if rng.random() < 0.05:
            out.append(tokens(50, 3000))  # a one-off prompt, shared with nothing
            continue
        k = rng.randrange(len(live))
        conversation, left = live[k]
        conversation.extend(tokens(20, 200))  # the user's turn
        out.append(list(conversation))
        conversation.extend(tokens(20, 300))  # the answer, re-sent next turn
        if left <= 1:
            live.pop(k)
        else:
            live[k] = (conversation, left - 1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2,000 requests instead of 20,000")
    parser.add_argument("--requests", type=int, default=None, help="requests in the trace")
    args = parser.parse_args(argv)
    num_requests = args.requests or (2_000 if args.quick else 20_000)
    trace = make_trace(num_requests)
    total_tokens = sum(len(p) for p in trace)

    started = time.perf_counter()
    blocks = [block_ids(p, BLOCK_SIZE) for p in trace]
    hash_s = time.perf_counter() - started

    started = time.perf_counter()
    curve = StackDistanceCurve(BLOCK_SIZE, kv_bytes_per_token=KV_BYTES_PER_TOKEN)
    for prompt, ids in zip(trace, blocks, strict=True):
        curve.add_blocks(ids, len(prompt))
    points = curve.curve()
    mattson_s = time.perf_counter() - started

    started = time.perf_counter()
    brute = [simulate_lru_blocks(blocks, p.capacity_blocks) * BLOCK_SIZE for p in points]
    brute_s = time.perf_counter() - started
    max_abs_error = max(
        abs(p.reused_tokens - b) / total_tokens for p, b in zip(points, brute, strict=True)
    )

    bound = max(1, curve.distinct_blocks // 4)
    bounded = StackDistanceCurve(BLOCK_SIZE, max_blocks=bound)
    for prompt, ids in zip(trace, blocks, strict=True):
        bounded.add_blocks(ids, len(prompt))
    bounded_error = max(
        abs(p.reused_tokens - b) / total_tokens
        for p, b in zip(bounded.curve(c.capacity_tokens for c in points), brute, strict=True)
        if p.exact
    )

    print(f"{num_requests:,} requests, {total_tokens:,} prompt tokens, "
          f"{curve.num_accesses:,} block accesses, {curve.distinct_blocks:,} distinct blocks "
          f"of {BLOCK_SIZE} tokens; KV {KV_BYTES_PER_TOKEN:,} bytes a token (Llama-3.1-8B bf16)")
    print()
    for line in format_curve(points, total_tokens=curve.total_tokens):
        print(line)
    print()
    print(f"hashing (both)     {hash_s:8.2f} s")
    print(f"one Mattson pass   {mattson_s:8.2f} s  ({len(points)} capacities)")
    print(f"brute force        {brute_s:8.2f} s  ({len(points)} LRU simulations)")
    print(f"bounded to {bound:,} blocks: max abs error below the bound {bounded_error:.2g}")
    print()
    print(
        f"capacity_curve mattson_s={mattson_s:.3f} brute_s={brute_s:.3f} "
        f"speedup={brute_s / mattson_s:.2f} max_abs_error={max_abs_error:.3g}"
    )


if __name__ == "__main__":
    main()
