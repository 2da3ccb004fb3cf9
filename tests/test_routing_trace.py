"""The routing benchmark's trace, its result arithmetic, and the replicas' tokenizer."""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.replica_main import ChatTokenizer

ROOT = Path(__file__).resolve().parent.parent


def load_bench_module(name: str) -> ModuleType:
    """Import ``bench/<name>.py`` (bench/ is scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


rt = load_bench_module("routing_trace")

SMALL = rt.TraceSpec(seed=3, num_tenants=10, num_sessions=200, requests_per_s=40.0)


def result(session: int, turn: int, ok: bool = True, ttft_s: float | None = 0.1, **kw: Any) -> Any:
    return rt.TurnResult(session, turn, ok=ok, sent_s=0.0, done_s=1.0, ttft_s=ttft_s, **kw)


def delta(**kw: float) -> dict[str, float]:
    base = {
        "requests": 0,
        "prompt_tokens": 0,
        "cached_tokens": 0,
        "prefill_tokens_computed": 0,
        "completion_tokens": 0,
        "queue_wait_s": 0.0,
        "evicted_blocks": 0,
    }
    return {**base, **kw}


# -- the trace ------------------------------------------------------------------------------


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    assert rt.make_trace(SMALL) == rt.make_trace(SMALL)
    other = rt.make_trace(replace(SMALL, seed=4))
    assert other.system_prompts != rt.make_trace(SMALL).system_prompts


def test_quick_trace_is_a_prefix_of_the_full_one() -> None:
    full = rt.make_trace(SMALL)
    short = rt.make_trace(replace(SMALL, num_sessions=20))
    assert short.system_prompts == full.system_prompts
    assert short.sessions == full.sessions[:20]


def test_system_prompts_are_distinct_and_sized() -> None:
    trace = rt.make_trace(SMALL)
    assert len(set(trace.system_prompts)) == SMALL.num_tenants
    for prompt in trace.system_prompts:
        body = prompt.split("\n\n", 1)[1]
        assert SMALL.system_words[0] <= len(body.split()) <= SMALL.system_words[1]


def test_sessions_have_their_turns_questions_and_think_times() -> None:
    trace = rt.make_trace(SMALL)
    for s in trace.sessions:
        assert SMALL.turns[0] <= len(s.questions) <= SMALL.turns[1]
        assert len(s.think_s) == len(s.questions) - 1
        assert all(q.startswith(f"Question {s.session_id}.") for q in s.questions)
    starts = [s.start_s for s in trace.sessions]
    assert starts == sorted(starts) and starts[0] == 0.0
    assert trace.num_requests == sum(len(s.questions) for s in trace.sessions)


def test_arrivals_are_poisson_at_the_offered_rate() -> None:
    trace = rt.make_trace(replace(SMALL, num_sessions=4000, question_words=(1, 2)))
    mean_gap = trace.arrival_window_s / (len(trace.sessions) - 1)
    assert mean_gap == pytest.approx(1 / SMALL.sessions_per_s, rel=0.05)
    offered = trace.num_requests / trace.arrival_window_s
    assert offered == pytest.approx(SMALL.requests_per_s, rel=0.06)


def test_tenant_popularity_follows_zipf() -> None:
    weights = rt.zipf_weights(5, 1.0)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] / weights[1] == pytest.approx(2.0)
    trace = rt.make_trace(replace(SMALL, num_sessions=4000, question_words=(1, 2)))
    counts = sorted(
        (sum(1 for s in trace.sessions if s.tenant == t) for t in range(SMALL.num_tenants)),
        reverse=True,
    )
    expected = rt.zipf_weights(SMALL.num_tenants, SMALL.zipf_s)
    assert counts[0] / 4000 == pytest.approx(expected[0], abs=0.03)
    assert counts[-1] < counts[0] / 5


def test_conversations_carry_the_earlier_answers_in_order() -> None:
    trace = rt.make_trace(replace(SMALL, num_sessions=3))
    convs = rt.conversations(trace)
    assert len(convs) == trace.num_requests
    longest = max(convs, key=len)
    assert longest[0]["role"] == "system"
    assert [m["role"] for m in longest[1:]] == ["user", "assistant"] * (len(longest) // 2 - 1) + [
        "user"
    ]
    assert all(m["content"] == rt.sim_answer(16) for m in longest if m["role"] == "assistant")


# -- the arithmetic -------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert rt.percentile(values, 50) == 50
    assert rt.percentile(values, 99) == 99
    assert rt.percentile(values, 100) == 100
    assert rt.percentile([7.0], 99) == 7.0
    assert math.isnan(rt.percentile([], 50))


def test_ratio_and_spread_edge_cases() -> None:
    assert rt.ratio(3, 2) == 1.5
    assert math.isnan(rt.ratio(1, 0))
    assert math.isnan(rt.ratio(math.nan, 2))
    assert rt.spread([2, 4, 3]) == 2.0
    assert rt.spread([0, 5]) == math.inf
    assert rt.spread([0, 0]) == 1.0


def test_replica_delta_subtracts_numeric_counters_only() -> None:
    before = {"name": "r0", "requests": 2, "queue_wait_s": 0.5, "fail_mode": None}
    after = {"name": "r0", "requests": 7, "queue_wait_s": 1.5, "fail_mode": None, "new": 3}
    assert rt.replica_delta(before, after) == {"requests": 5, "queue_wait_s": 1.0, "new": 3}


def test_summarize_adds_up_replicas_and_client_results() -> None:
    trace = rt.make_trace(replace(SMALL, num_sessions=2))
    fleet = rt.FleetSpec(
        num_replicas=2, max_concurrency=2, prefill_us_per_token=1000, decode_ms_per_token=10
    )
    results = [
        result(0, 0, ttft_s=0.1, cached_tokens=0),
        result(0, 1, ttft_s=0.3, cached_tokens=32),
        result(1, 0, ok=False, ttft_s=None, error="HTTP 503"),
    ]
    deltas = [
        delta(requests=2, prompt_tokens=300, cached_tokens=32, prefill_tokens_computed=268,
              completion_tokens=32, queue_wait_s=0.2, evicted_blocks=1),
        delta(requests=1, prompt_tokens=100, cached_tokens=0, prefill_tokens_computed=100,
              completion_tokens=16, queue_wait_s=0.1),
    ]  # fmt: skip
    row = rt.summarize("x", trace, fleet, results, deltas, duration_s=2.0)
    assert (row.requests, row.failed) == (2, 1)
    assert row.unsent == trace.num_requests - 3
    assert row.prefill_tokens == 368 and row.prompt_tokens == 400
    assert row.hit_rate == pytest.approx(32 / 400)
    assert row.ttft_p50_ms == pytest.approx(100) and row.ttft_p99_ms == pytest.approx(300)
    assert row.requests_per_s == 1.0 and row.prompt_tokens_per_s == 200.0
    # busy: 368 tokens x 1 ms + 48 steps x 10 ms = 0.848 s over 2 x 2 slots x 2 s
    assert row.utilization == pytest.approx(0.848 / 8)
    assert row.queue_ms == pytest.approx(100)
    assert row.per_replica_prefill == [268, 100] and row.prefill_spread == 2.68
    assert row.requests_spread == 2.0 and row.evicted_blocks == 1
    assert row.client_cached_tokens == 32
    assert row.errors == {"HTTP 503": 1}


def test_headline_uses_the_best_sglang_row_and_nan_for_missing_rows() -> None:
    rows = {
        "kvern_round_robin": rt.Row("kvern_round_robin", prefill_tokens=900, ttft_p99_ms=50),
        "kvern_least_load": rt.Row("kvern_least_load", prefill_tokens=800, ttft_p99_ms=40),
        "kvern_cache_aware": rt.Row(
            "kvern_cache_aware", prefill_tokens=300, hit_rate=0.9, ttft_p99_ms=30
        ),
        "sglang_openai": rt.Row("sglang_openai", hit_rate=0.5),
        "sglang_sglang": rt.Row("sglang_sglang", hit_rate=0.8, ttft_p99_ms=60),
    }
    figures, best = rt.headline_figures(rows, ["sglang_openai", "sglang_sglang"])
    assert best == "sglang_sglang"
    assert figures == {
        "prefill_ratio_rr_over_cache_aware": 3.0,
        "hit_rate_cache_aware": 0.9,
        "hit_rate_sglang": 0.8,
        "p99_ttft_ratio_cache_aware_over_least_load": 0.75,
        "p99_ttft_ratio_cache_aware_over_sglang": 0.5,
    }
    assert rt.headline(figures) == (
        "prefill_ratio_rr_over_cache_aware=3.000 hit_rate_cache_aware=0.9000 "
        "hit_rate_sglang=0.8000 p99_ttft_ratio_cache_aware_over_least_load=0.750 "
        "p99_ttft_ratio_cache_aware_over_sglang=0.500"
    )
    rows["kvern_round_robin"] = rt.Row("kvern_round_robin", error="did not start")
    del rows["sglang_sglang"]
    figures, best = rt.headline_figures(rows, ["sglang_openai", "sglang_sglang"])
    assert math.isnan(figures["prefill_ratio_rr_over_cache_aware"]) and best == "sglang_openai"


def test_prefill_bound_counts_whole_shared_blocks_once() -> None:
    a = list(range(40))  # 2 full blocks of 16 + 8
    b = list(range(40)) + [99] * 10  # extends a
    c = [7] * 40  # shares nothing
    computed, total = rt.prefill_bound([a, b, c, a], block_size=16)
    assert total == 40 + 50 + 40 + 40
    # a: all; b: 2 blocks cached; c: all; a again: its 2 blocks (the last token is computed anyway)
    assert computed == 40 + (50 - 32) + 40 + (40 - 32)
    exact = list(range(32))  # two full blocks: the last one must still be computed
    assert rt.prefill_bound([exact, exact], 16) == (32 + 16, 64)


# -- the replicas' tokenizer ---------------------------------------------------------------


def test_replica_tokenizer_matches_apply_chat_template(hf_tokenizers: dict[str, Any]) -> None:
    """The segment-cached ids equal transformers' on the benchmark's own conversations."""
    from tests.assets import tokenizer_fixture

    hf = hf_tokenizers["qwen2"]
    fast = ChatTokenizer.from_directory(tokenizer_fixture("qwen2").directory)
    trace = rt.make_trace(replace(SMALL, num_sessions=6))
    convs = rt.conversations(trace)
    convs.append([{"role": "user", "content": "Ünïcödé 日本語 <|im_end|> tabs\tand  spaces\n\n"}])
    for messages in convs:
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert fast({"messages": messages}) == list(expected)
    assert fast.fast, "the segment cache must have stayed on"


def test_the_working_set_counts_each_distinct_block_once() -> None:
    a = list(range(40))  # 2 full blocks
    b = list(range(40)) + [99] * 30  # extends a: 2 more full blocks
    c = [7] * 40  # 2 blocks of its own
    assert rt.working_set_blocks([a, b, c, a], block_size=16) == 6
    assert rt.block_chain(b, 16)[:2] == rt.block_chain(a, 16)


def test_the_live_working_set_counts_only_the_sessions_in_flight_together() -> None:
    spec = rt.TraceSpec(num_tenants=1, num_sessions=2, turns=(2, 2), max_tokens=4)

    def tokenize(body: dict[str, object]) -> list[int]:
        # One token per character of every message: blocks follow text length.
        return [ord(ch) for m in body["messages"] for ch in m["content"]]  # type: ignore[attr-defined,index]

    def live(gap_s: float) -> tuple[int, int]:
        sessions = tuple(
            rt.Session(i, 0, i * gap_s, ("q" * 64, "r" * 64), (1.0,)) for i in range(2)
        )
        trace = rt.Trace(spec, ("s" * 160,), sessions)
        return rt.live_working_set_blocks(trace, tokenize, block_size=16, turn_s=0.5)

    together, system = live(0.0)
    apart, _ = live(100.0)
    assert system == 10
    # Each session adds (64 + 12) * 2 = 152 tokens to the 160 of the system prompt: 9 blocks.
    assert together == system + 2 * 9
    assert apart == system + 9


def _chars(body: dict[str, object]) -> list[int]:
    """One token per character of every message."""
    return [ord(ch) for m in body["messages"] for ch in m["content"]]  # type: ignore[attr-defined,index]


def _one_tenant_two_sessions() -> rt.Trace:
    """Session 0 is listed first but starts last: session 1 computes the system prompt."""
    spec = rt.TraceSpec(num_tenants=1, num_sessions=2, turns=(2, 2), max_tokens=4)
    sessions = (
        rt.Session(0, 0, 5.0, ("a" * 64, "b" * 64), (1.0,)),
        rt.Session(1, 0, 0.0, ("c" * 64, "d" * 64), (1.0,)),
    )
    return rt.Trace(spec, ("s" * 160,), sessions)


def test_the_ttft_floor_charges_a_tenants_system_prompt_to_the_session_that_starts_first() -> None:
    trace, tokenize = _one_tenant_two_sessions(), _chars
    fleet = rt.FleetSpec(prefill_us_per_token=1000.0, decode_ms_per_token=20.0)

    floors = rt.ttft_floor_ms(trace, tokenize, fleet)

    # First to start: 160 + 64 tokens, all computed, then one decode step.
    # Its next turn reuses those 14 blocks and computes the answer (12) and
    # the question (64). The later session reuses the 10 system blocks.
    assert floors == [224 + 20, 76 + 20, 64 + 20, 76 + 20]


def test_the_bound_per_request_is_keyed_by_session_and_turn_in_the_order_sessions_start() -> None:
    trace, tokenize = _one_tenant_two_sessions(), _chars

    bound = rt.bound_per_request(trace, tokenize, block_size=16)

    # Session 1 starts first and computes the system prompt; session 0 reuses it.
    assert bound == {(1, 0): 224, (1, 1): 76, (0, 0): 64, (0, 1): 76}
    prompts = [tokenize({"messages": m}) for _, _, m in rt._turns(trace)]
    assert sum(bound.values()) == rt.prefill_bound(prompts, 16)[0]
