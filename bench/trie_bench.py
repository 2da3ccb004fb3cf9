"""Benchmarks for kvern's hot paths: ``python bench/trie_bench.py [--quick]``.

Why a synthetic multi-tenant chat trace: the trie's cost is dominated by how
requests share prefixes, and real chat traffic is many sessions over a few
popular system prompts, each turn re-sending the whole conversation so far.
The trace reproduces that shape with a seeded RNG so runs compare.

Trie section: ``insert`` (one call = the match and the insert) over every
request, timed with ``perf_counter_ns`` around the call only; the median of 3
repetitions on a fresh trie each. Requests are plain ``list[int]``, as a
tokenizer returns them, so the one ``array('i')`` conversion per request is
included. Budgeted runs then keep 1/4 and 1/10 of the unbounded trie's tokens,
calling ``maintain`` after each insert, and report for ``lru``, ``lfu`` and
``cost_aware`` side by side the prefix hit rate that budget keeps and the
ns/token of insert + maintain (one run each).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

# The checkout's root: kvern (when not installed) and tests.assets (the real tokenizers).
ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from kvern.trie import RadixTrie, make_policy  # noqa: E402 - after the sys.path set-up above

_SEED = 20240611
_VOCAB_SIZE = 128_000
# Budgets as a fraction of the unbounded trie's tokens: 1/4, 1/10.
_BUDGET_DIVISORS = (4, 10)
# Policies compared under each budget, in table order.
_BUDGET_POLICIES = ("lru", "lfu", "cost_aware")


@dataclass(slots=True)
class ChatTrace:
    """Requests of many interleaved chat sessions, in arrival order."""

    # Each session's full final conversation (system prompt + all turns).
    conversations: list[array[int]]
    # (arrival time in s, session index, prompt length in tokens), time-ordered.
    requests: list[tuple[float, int, int]]

    @property
    def num_request_tokens(self) -> int:
        """Tokens over all requests, counting re-sent history every time."""
        return sum(num_tokens for _, _, num_tokens in self.requests)


def _random_tokens(rng: random.Random, num_tokens: int) -> array[int]:
    return array("i", rng.choices(range(_VOCAB_SIZE), k=num_tokens))


def make_chat_trace(quick: bool, seed: int = _SEED) -> ChatTrace:
    """A seeded multi-tenant chat trace.

    System prompts of 200-2,000 tokens are picked by Zipf popularity; each
    session has 1-10 turns of a user message (20-200 tokens) and an assistant
    reply (20-300 tokens); a request is the whole conversation before the reply.
    """
    rng = random.Random(seed)
    num_system_prompts = 10 if quick else 40
    num_sessions = 300 if quick else 3000
    duration_s = 600.0 if quick else 3600.0
    system_prompts = [
        _random_tokens(rng, rng.randint(200, 2000)) for _ in range(num_system_prompts)
    ]
    zipf_weights = [1.0 / (rank + 1) for rank in range(num_system_prompts)]
    conversations: list[array[int]] = []
    requests: list[tuple[float, int, int]] = []
    for session in range(num_sessions):
        conversation = array("i", rng.choices(system_prompts, weights=zipf_weights)[0])
        at_s = rng.uniform(0.0, duration_s)
        for _ in range(rng.randint(1, 10)):
            conversation.extend(_random_tokens(rng, rng.randint(20, 200)))
            requests.append((at_s, session, len(conversation)))
            conversation.extend(_random_tokens(rng, rng.randint(20, 300)))
            at_s += rng.uniform(5.0, 60.0)  # the user reads and types
        conversations.append(conversation)
    requests.sort()
    return ChatTrace(conversations, requests)


@dataclass(slots=True)
class ReplayResult:
    """One replay of a trace through a trie."""

    # Nanoseconds inside insert (+ maintain when budgeted).
    elapsed_ns: int
    # Tokens the trie already held when each request arrived, summed.
    num_matched_tokens: int
    # Tokens stored at the end.
    num_stored_tokens: int
    # Nodes at the end.
    num_nodes: int


def replay(trace: ChatTrace, trie: RadixTrie, max_tokens: int | None = None) -> ReplayResult:
    """Insert every request in order, timing only the trie calls."""
    perf_counter_ns = time.perf_counter_ns
    conversations = trace.conversations
    elapsed_ns = 0
    num_matched = 0
    for at_s, session, num_tokens in trace.requests:
        prompt = conversations[session][:num_tokens].tolist()
        start_ns = perf_counter_ns()
        result = trie.insert(prompt, at_s)
        if max_tokens is not None:
            trie.maintain(max_tokens, at_s)
        elapsed_ns += perf_counter_ns() - start_ns
        num_matched += result.matched_tokens
    return ReplayResult(elapsed_ns, num_matched, trie.num_tokens, trie.num_nodes)


def run_trie_bench(quick: bool) -> dict[str, float]:
    """Trie section: ns/token of insert, unbounded and under each budget and policy.

    Budgeted keys are ``budget_<d>_max_tokens`` and
    ``budget_<d>_<policy>_{prefix_hit_rate,ns_per_token}`` for each divisor d.
    """
    trace = make_chat_trace(quick)
    num_request_tokens = trace.num_request_tokens
    repetitions = [replay(trace, RadixTrie()) for _ in range(3)]
    unbounded = sorted(repetitions, key=lambda r: r.elapsed_ns)[1]  # the median of 3
    ns_per_token = unbounded.elapsed_ns / num_request_tokens
    results = {
        "num_requests": float(len(trace.requests)),
        "num_request_tokens": float(num_request_tokens),
        "trie_stored_tokens": float(unbounded.num_stored_tokens),
        "trie_nodes": float(unbounded.num_nodes),
        "trie_ns_per_token": ns_per_token,
        "trie_tokens_per_s": 1e9 / ns_per_token,
        "trie_prefix_hit_rate": unbounded.num_matched_tokens / num_request_tokens,
    }
    for divisor in _BUDGET_DIVISORS:
        max_tokens = unbounded.num_stored_tokens // divisor
        results[f"budget_{divisor}_max_tokens"] = float(max_tokens)
        for name in _BUDGET_POLICIES:
            # A fresh policy per trie: cost_aware keeps its aging clock in it.
            budgeted = replay(trace, RadixTrie(make_policy(name)), max_tokens)
            prefix = f"budget_{divisor}_{name}"
            results[f"{prefix}_prefix_hit_rate"] = budgeted.num_matched_tokens / num_request_tokens
            results[f"{prefix}_ns_per_token"] = budgeted.elapsed_ns / num_request_tokens
    return results


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in rows)
    value_width = max(14, *(len(value) for _, value in rows))
    print(f"\n{title}")
    print("-" * len(title))
    for label, value in rows:
        print(f"  {label:<{width}}  {value:>{value_width}}")


def _budget_rows(trie: dict[str, float]) -> list[tuple[str, str]]:
    """Per budget: a header naming the policies, then hit rates and ns/token side by side."""
    rows: list[tuple[str, str]] = []
    for divisor in _BUDGET_DIVISORS:
        max_tokens = trie[f"budget_{divisor}_max_tokens"]
        rows.append((f"budget 1/{divisor}, tokens", f"{max_tokens:,.0f}"))
        rows.append(("  policy", "  ".join(f"{name:>10}" for name in _BUDGET_POLICIES)))
        for label, metric, spec in (
            ("  prefix hit rate", "prefix_hit_rate", ".2%"),
            ("  ns/token, insert+maintain", "ns_per_token", ".1f"),
        ):
            values = (trie[f"budget_{divisor}_{name}_{metric}"] for name in _BUDGET_POLICIES)
            rows.append((label, "  ".join(f"{value:>10{spec}}" for value in values)))
    return rows


def _tokenization_chat(turns: int, rng: random.Random) -> list[list[dict[str, str]]]:
    """A growing chat with realistic message sizes; one ``messages`` list per turn."""
    words = (
        "cache prefix token model latency request answer system user value block "
        "decode prefill replica budget policy trie memory hit miss"
    ).split()

    def text(n_words: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n_words)) + "."

    history = [{"role": "system", "content": text(350)}]
    out = []
    for _ in range(turns):
        history = history + [{"role": "user", "content": text(rng.randint(40, 120))}]
        out.append(history)
        history = history + [{"role": "assistant", "content": text(rng.randint(80, 200))}]
    return out


def run_tokenization_bench(quick: bool) -> dict[str, float]:
    """Turn-20 cost with and without the incremental segment cache, same run, same text.

    Uses the real Llama 3 tokenizer and Llama 3.2 chat template (derived offline
    from the llama-cpp-python sdist, see tests/assets.py). Each repetition feeds
    turns 1-19 into a fresh segment cache, then times turn 20 both ways.
    """
    from transformers import AutoTokenizer

    from kvern.prompt.render import render_chat
    from kvern.tokenize.incremental import SegmentTokenizer
    from tests.assets import tokenizer_fixture

    hf = AutoTokenizer.from_pretrained(str(tokenizer_fixture("llama3").directory))
    backend = hf.backend_tokenizer
    turns = 20
    chats = _tokenization_chat(turns, random.Random(7))
    texts = [render_chat(hf, m).text for m in chats]
    last = texts[-1]
    reps = 5 if quick else 15
    full_ns: list[int] = []
    inc_ns: list[int] = []
    render_ns: list[int] = []
    for _ in range(reps):
        seg = SegmentTokenizer(backend, verify_every=0)
        for text in texts[:-1]:
            seg.encode(text)
        t0 = time.perf_counter_ns()
        whole = backend.encode(last, add_special_tokens=False).ids
        t1 = time.perf_counter_ns()
        ids, used = seg.encode(last)
        t2 = time.perf_counter_ns()
        render_chat(hf, chats[-1])
        t3 = time.perf_counter_ns()
        assert used and list(ids) == whole, "incremental ids must equal whole-string ids"
        full_ns.append(t1 - t0)
        inc_ns.append(t2 - t1)
        render_ns.append(t3 - t2)
    full = statistics.median(full_ns)
    inc = statistics.median(inc_ns)
    rend = statistics.median(render_ns)
    return {
        "turn": float(turns),
        "prompt_tokens": float(len(whole)),
        "full_tokenize_us": full / 1000,
        "incremental_tokenize_us": inc / 1000,
        "render_us": rend / 1000,
        "incremental_tokenize_ratio": inc / full,
        "with_render_ratio": (inc + rend) / (full + rend),
    }


def main(argv: list[str] | None = None) -> None:
    """Run every section, print a table per section, then one summary line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smaller trace, for a smoke run")
    args = parser.parse_args(argv)
    summary: dict[str, float] = {}

    trie = run_trie_bench(args.quick)
    summary["trie_ns_per_token"] = trie["trie_ns_per_token"]
    _print_table(
        "Trie: insert (match + insert) over a multi-tenant chat trace",
        [
            ("requests", f"{trie['num_requests']:,.0f}"),
            ("request tokens", f"{trie['num_request_tokens']:,.0f}"),
            ("stored tokens", f"{trie['trie_stored_tokens']:,.0f}"),
            ("nodes", f"{trie['trie_nodes']:,.0f}"),
            ("ns/token (median of 3)", f"{trie['trie_ns_per_token']:.1f}"),
            ("tokens/s", f"{trie['trie_tokens_per_s']:,.0f}"),
            ("prefix hit rate", f"{trie['trie_prefix_hit_rate']:.2%}"),
            *_budget_rows(trie),
        ],
    )

    tok = run_tokenization_bench(args.quick)
    summary["incremental_tokenize_ratio"] = tok["incremental_tokenize_ratio"]
    _print_table(
        "Tokenization of turn 20 of a growing chat (Llama 3 tokenizer + Llama 3.2 template)",
        [
            ("prompt tokens at turn 20", f"{tok['prompt_tokens']:,.0f}"),
            ("whole string, us (median)", f"{tok['full_tokenize_us']:,.1f}"),
            ("incremental, us (median)", f"{tok['incremental_tokenize_us']:,.1f}"),
            ("ratio incremental / whole", f"{tok['incremental_tokenize_ratio']:.3f}"),
            ("chat template render, us", f"{tok['render_us']:,.1f}"),
            ("ratio incl. render", f"{tok['with_render_ratio']:.3f}"),
        ],
    )

    # Further sections add their tables above and their keys to ``summary``.
    print()
    print(" ".join(f"{key}={value:.4g}" for key, value in summary.items()))


if __name__ == "__main__":
    main()
