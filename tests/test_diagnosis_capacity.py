"""The capacity curve: Mattson's one pass equals an LRU prefix-cache simulation, token for token.

Why equality and not closeness: the one-pass method rests on an argument (LRU
stack inclusion over an access trace that is the same at every capacity,
blocks after a request's first miss included); a slip in it -- an off-by-one
at the capacity, a run shortcut, a renumbering -- shows as a few blocks
here and there, which "within 1 %" would hide.
"""

from __future__ import annotations

import os
import signal
from array import array
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvern.app import create_app
from kvern.config import KvernConfig, parse_config
from kvern.diagnosis.capacity import StackDistanceCurve, block_ids, format_curve
from kvern.diagnosis.kv_size import kv_bytes_per_token
from kvern.diagnosis.lru_reference import simulate_lru, simulate_lru_blocks
from kvern.prompt.normalize import Normalizer
from kvern.prompt.requests import read_prompt
from kvern.tokenize.registry import TokenizerRegistry
from kvern.tracking.capacity import MIN_BLOCK_TOKENS, CapacityCurves
from tests.servers import chat_answer, serve, serve_chat
from tests.truth import flush

# -- traces ------------------------------------------------------------------------


@st.composite
def prompt_traces(draw: st.DrawFn) -> list[list[int]]:
    """Prompts that share prefixes: each extends an earlier one's prefix, or starts afresh.

    A tiny vocabulary makes equal blocks likely; repeats of whole prompts,
    shorter and longer re-sends, and empty prompts all occur.
    """
    vocab = st.integers(0, 3)
    out: list[list[int]] = []
    for _ in range(draw(st.integers(1, 25))):
        if out and draw(st.booleans()):
            base = draw(st.sampled_from(out))
            keep = draw(st.integers(0, len(base)))
            out.append(base[:keep] + draw(st.lists(vocab, max_size=8)))
        else:
            out.append(draw(st.lists(vocab, max_size=14)))
    return out


def curve_of(
    prompts: list[list[int]], block_size: int, *, check: bool = True, **kwargs: Any
) -> StackDistanceCurve:
    curve = StackDistanceCurve(block_size, **kwargs)
    for ids in prompts:
        curve.add(ids)
        if check:
            curve.check_invariants()
    return curve


# -- Mattson == brute force ----------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    prompts=prompt_traces(),
    block_size=st.integers(1, 4),
    tree_slots=st.sampled_from([1, 2, 3, 1024]),
)
def test_reused_tokens_equal_an_lru_simulation_at_every_capacity(
    prompts: list[list[int]], block_size: int, tree_slots: int
) -> None:
    curve = curve_of(prompts, block_size, min_tree_slots=tree_slots)
    for capacity in range(curve.distinct_blocks + 3):
        assert curve.reused_tokens(capacity) == simulate_lru(prompts, block_size, capacity)


@settings(max_examples=300, deadline=None)
@given(
    requests=st.lists(st.lists(st.integers(0, 7), max_size=10), min_size=1, max_size=25),
    tree_slots=st.sampled_from([1, 2, 1024]),
)
def test_any_block_trace_not_only_chained_prefixes_equals_the_simulation(
    requests: list[list[int]], tree_slots: int
) -> None:
    """Block ids drawn freely: a block can hit after a miss, repeat within a request."""
    curve = StackDistanceCurve(1, min_tree_slots=tree_slots)
    for blocks in requests:
        curve.add_blocks(blocks, len(blocks))
        curve.check_invariants()
    for capacity in range(10):
        assert curve.reused_blocks(capacity) == simulate_lru_blocks(requests, capacity)


def test_blocks_after_a_requests_first_miss_are_not_reused_but_still_cached() -> None:
    # Capacity 2 blocks of one token: [1, 2] misses twice; [1, 2] again hits
    # twice; [3] evicts 1 (the least recent); [1, 2]: 1 misses and is
    # re-inserted, evicting 2 -- so 2 misses too, though it was cached when
    # the request began. Then [1, 2] hits both: 2 was inserted after the miss.
    prompts = [[1, 2], [1, 2], [3], [1, 2], [1, 2]]
    assert simulate_lru(prompts, 1, 2) == 4
    curve = curve_of(prompts, 1)
    assert curve.reused_tokens(2) == 4
    # One block holds nothing twice; three hold all but the first sight of each.
    assert [curve.reused_tokens(c) for c in range(5)] == [0, 0, 4, 6, 6]


def test_a_hand_computed_curve() -> None:
    # Blocks of 2 tokens: A = [a1 a2] (4 tokens), B = A + [b3] (6), A again
    # (4), then C (2 tokens, new). Stack distances (distinct blocks since):
    # B: a1 1 (a2), a2 1 (a1), b3 new -> 2 blocks reused from capacity 2.
    # A again: a1 2 (a2, b3), a2 2 (b3, a1) -> 2 more from capacity 3.
    a, b, c = [1, 1, 2, 2], [1, 1, 2, 2, 3, 3], [9, 9]
    curve = curve_of([a, b, a, c], 2)
    assert curve.total_tokens == 16
    assert curve.distinct_blocks == 4
    points = {p.capacity_blocks: p for p in curve.curve(range(0, 12, 2))}
    assert {c: p.reused_tokens for c, p in points.items()} == {0: 0, 1: 0, 2: 4, 3: 8, 4: 8, 5: 8}
    assert points[3].reuse_share == 0.5
    assert points[3].gib is None and points[3].exact


def test_the_default_capacities_run_in_powers_of_two_to_what_holds_everything() -> None:
    curve = curve_of([list(range(40)), list(range(40))], 4, kv_bytes_per_token=1 << 20)
    points = curve.curve()
    assert [p.capacity_blocks for p in points] == [1, 2, 4, 8, 10]
    assert points[-1].reused_tokens == 40 and points[-1].reuse_share == 0.5
    assert points[-1].gib == 40 * (1 << 20) / (1 << 30)
    lines = format_curve(points, total_tokens=curve.total_tokens)
    assert len(lines) == len(points) + 2 and "50.0%" in lines[-2]


def test_a_partial_trailing_block_is_never_cached_but_counts_as_a_prompt_token() -> None:
    curve = curve_of([[5, 6, 7], [5, 6, 7]], 2)
    assert curve.total_tokens == 6
    assert curve.reused_tokens(10) == 2  # the [5, 6] block; 7 is never cached
    assert simulate_lru([[5, 6, 7], [5, 6, 7]], 2, 10) == 2


# -- block ids ---------------------------------------------------------------------------


def test_block_ids_are_chained_full_blocks_and_stable() -> None:
    ids = block_ids([1, 2, 3, 4, 5], 2)
    assert len(ids) == 2  # [5] is not a full block
    assert block_ids(array("i", [1, 2, 3, 4]), 2) == ids  # list or array alike
    assert block_ids([1, 2, 3, 4, 6, 6], 2)[:2] == ids  # equal prefix, equal ids
    other = block_ids([0, 2, 3, 4], 2)
    assert other[0] != ids[0] and other[1] != ids[1]  # block 1 differs with block 0
    assert block_ids([3, 4], 2)[0] != ids[1]  # the same tokens elsewhere: another id
    # The same in every process and Python version (blake2b, not hash()).
    assert ids[0] == int.from_bytes(
        __import__("hashlib")
        .blake2b(bytes(8) + array("i", [1, 2]).tobytes(), digest_size=8)
        .digest(),
        "little",
    )
    with pytest.raises(ValueError, match="block_size"):
        block_ids([1], 0)


# -- bounded memory -----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    prompts=prompt_traces(),
    block_size=st.integers(1, 3),
    max_blocks=st.integers(1, 12),
    tree_slots=st.sampled_from([1, 4, 1024]),
)
def test_a_bounded_curve_is_exact_up_to_its_bound_and_a_lower_bound_above(
    prompts: list[list[int]], block_size: int, max_blocks: int, tree_slots: int
) -> None:
    curve = curve_of(prompts, block_size, max_blocks=max_blocks, min_tree_slots=tree_slots)
    assert curve.tracked_blocks <= max_blocks
    for capacity in range(max_blocks + 6):
        exact = simulate_lru(prompts, block_size, capacity)
        if capacity <= max_blocks:
            assert curve.reused_tokens(capacity) == exact
        else:
            assert curve.reused_tokens(capacity) <= exact
    points = curve.curve(bs * block_size for bs in range(max_blocks + 3))
    assert [p.exact for p in points] == [p.capacity_blocks <= max_blocks for p in points]


def test_renumbering_keeps_the_curve_and_the_tree_does_not_grow_with_accesses() -> None:
    prompts = [[i % 7] * 3 + [i % 5] * 3 for i in range(3000)]  # few blocks, many accesses
    tight = curve_of(prompts, 3, check=False, min_tree_slots=1)
    roomy = curve_of(prompts, 3, check=False, min_tree_slots=1 << 16)
    tight.check_invariants()
    assert tight.num_accesses == 6000
    assert [p.to_dict() for p in tight.curve()] == [p.to_dict() for p in roomy.curve()]
    # At least twice the tracked blocks, plus room for one request: never per access.
    assert len(tight._tree) - 1 <= 2 * tight.tracked_blocks + 2 * 2
    # And renumbered once per tracked blocks' worth of accesses at most (amortised O(1)).
    assert 0 < tight.num_renumbers <= tight.num_accesses // tight.tracked_blocks + 1


def test_memory_is_bounded_by_max_blocks_however_much_is_fed() -> None:
    curve = StackDistanceCurve(1, max_blocks=100, min_tree_slots=1)
    for start in range(0, 50_000, 50):
        curve.add(list(range(start, start + 50)))
    curve.check_invariants()
    assert curve.tracked_blocks == 100
    assert curve.num_forgotten == 50_000 - 100
    assert len(curve._tree) - 1 <= 2 * 100 + 2 * 50
    assert len(curve._by_running_max) <= 2 * 100
    assert curve.curve()[-1].capacity_blocks == 100  # default capacities stop at the bound


# -- KV bytes per token ----------------------------------------------------------------------


def test_kv_bytes_per_token_of_known_configs() -> None:
    llama_31_8b = {
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_size": 4096,
        "torch_dtype": "bfloat16",
    }
    assert kv_bytes_per_token(llama_31_8b) == 2 * 32 * 8 * 128 * 2 == 131_072
    assert kv_bytes_per_token(llama_31_8b, dtype_bytes=1) == 65_536  # an fp8 KV cache
    qwen25_7b = {"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                 "hidden_size": 3584, "dtype": "bfloat16"}  # fmt: skip
    assert kv_bytes_per_token(qwen25_7b) == 2 * 28 * 4 * 128 * 2 == 57_344
    gpt2 = {"n_layer": 12, "n_head": 12, "n_embd": 768, "torch_dtype": "float32"}  # no GQA
    assert kv_bytes_per_token(gpt2) == 2 * 12 * 12 * 64 * 4
    gemma = {"num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4,
             "hidden_size": 2048, "head_dim": 256}  # fmt: skip
    assert kv_bytes_per_token(gemma) == 2 * 2 * 4 * 256 * 2  # head_dim given; dtype default 2
    assert kv_bytes_per_token({"text_config": gemma, "model_type": "vlm"}) == 8192
    with pytest.raises(ValueError, match="dtype"):
        kv_bytes_per_token({**gemma, "torch_dtype": "complex64"})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        kv_bytes_per_token({"hidden_size": 8})


def test_kv_bytes_per_token_reads_the_config_transformers_writes(tmp_path: Path) -> None:
    from transformers import DeepseekV3Config, LlamaConfig

    llama = tmp_path / "llama"
    LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        dtype="bfloat16",
    ).save_pretrained(llama)
    assert kv_bytes_per_token(llama) == 131_072  # the model directory
    assert kv_bytes_per_token(llama / "config.json") == 131_072  # the file
    assert kv_bytes_per_token(str(llama)) == 131_072
    # Multi-head latent attention keeps one compressed latent a layer, not K and V.
    deepseek = tmp_path / "deepseek"
    DeepseekV3Config().save_pretrained(deepseek)
    assert kv_bytes_per_token(deepseek) == 61 * (512 + 64) * 2


# -- the live curve ---------------------------------------------------------------------------


def test_the_live_curves_use_the_tries_block_size_and_never_raise() -> None:
    curves = CapacityCurves(
        {"big": 64, "small": 1}.__getitem__, max_blocks=8, kv_bytes_per_token={"b*": 10}
    )
    curves.observe("big", list(range(200)))
    curves.observe("small", list(range(40)))
    curves.observe("small", [2**40])  # not a 32-bit token id: counted, not raised
    view = curves.view()
    assert view["errors"] == 1
    big, small = view["models"]["big"], view["models"]["small"]
    assert big["block_size"] == 64 and small["block_size"] == MIN_BLOCK_TOKENS
    assert big["kv_bytes_per_token"] == 10 and small["kv_bytes_per_token"] is None
    assert small["exact_up_to_tokens"] == 8 * MIN_BLOCK_TOKENS
    assert curves.view("big")["models"].keys() == {"big"}
    assert curves.view("nobody")["models"] == {}


MODEL = "qwen-capacity"
SYSTEM = "You are the capacity test's assistant. Answer in one short sentence. " * 8


def _config(tmp_path: Path, url: str, fixtures: dict[str, Any], **tracking: Any) -> KvernConfig:
    return parse_config(
        {
            "upstream": {"base_url": url + "/v1", "cache_model": {"kind": "radix"}},
            "tokenizers": {
                "models": {"*": str(fixtures["qwen2"].directory)},
                "parity_check": False,
            },
            "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 10},
            "tracking": {"capacity_curve_kv_bytes_per_token": {"qwen*": 57_344}, **tracking},
        }
    )


def _trace() -> list[dict[str, Any]]:
    """Three conversations over one system prompt, three turns each, interleaved."""
    bodies: list[dict[str, Any]] = []
    chats = {name: [{"role": "system", "content": SYSTEM}] for name in ("ada", "bob", "cy")}
    for turn in range(3):
        for name, messages in chats.items():
            messages.append({"role": "user", "content": f"{name} asks question {turn}."})
            bodies.append({"model": MODEL, "messages": list(messages), "max_tokens": 4})
            messages.append({"role": "assistant", "content": "ok"})
    return bodies


def _analytics(kvern: str, **params: Any) -> dict[str, Any]:
    response = httpx.get(kvern + "/analytics", params={"window": "all", **params}, timeout=30)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def test_the_live_curve_in_analytics_equals_the_curve_of_the_same_prompts_offline(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    bodies = _trace()
    with serve_chat(chat_answer, MODEL) as upstream:
        config = _config(tmp_path, upstream, tokenizer_fixtures)
        assert config.tracking.isolation == "process"  # the curve crosses a process
        with serve(create_app(config)) as kvern:
            for body in bodies:
                response = httpx.post(kvern + "/v1/chat/completions", json=body, timeout=30)
                assert response.status_code == 200
            flush(kvern)
            live = _analytics(kvern)
            only = _analytics(kvern, model="nobody")
    assert live["capacity_curve_error"] is None
    model = live["capacity_curve"]["models"][MODEL]
    assert only["capacity_curve"]["models"] == {}

    # The same prompts, rendered and tokenized by kvern's own tokenizer, offline.
    tok = TokenizerRegistry(config.tokenizers).get_sync(MODEL)
    offline = StackDistanceCurve(
        16, max_blocks=config.tracking.capacity_curve_max_blocks, kv_bytes_per_token=57_344
    )
    for body in bodies:
        asked = read_prompt("chat", body)
        assert asked is not None
        offline.add(tok.request(asked, normalizer=Normalizer.from_rules([])).ids)
    assert model["block_size"] == 16
    assert model["requests"] == len(bodies)
    assert model["prompt_tokens"] == offline.total_tokens
    assert model["points"] == [p.to_dict() for p in offline.curve()]
    # The shared system prompt and each conversation's history are reused.
    assert model["points"][-1]["reuse_share"] > 0.5
    assert model["points"][-1]["gib"] == model["points"][-1]["capacity_tokens"] * 57_344 / 2**30


def test_the_curve_is_null_with_the_reason_when_the_brain_does_not_answer(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    with serve_chat(chat_answer, MODEL) as upstream:
        app = create_app(_config(tmp_path, upstream, tokenizer_fixtures))
        with serve(app) as kvern:
            body = _trace()[0]
            assert httpx.post(kvern + "/v1/chat/completions", json=body, timeout=30).is_success
            flush(kvern)
            pid = app.state.services.tracker.stats.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)  # alive, answering nothing
            try:
                hung = _analytics(kvern, wait_s=0.2)
            finally:
                os.kill(pid, signal.SIGCONT)
    assert hung["capacity_curve"] is None
    # Not asked again once the drain went unanswered (each ask adds its timeout).
    assert "no answer to 'drain'" in hung["capacity_curve_error"]


def test_the_curve_is_null_and_says_so_when_it_is_off(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    with serve_chat(chat_answer, MODEL) as upstream:
        config = _config(
            tmp_path, upstream, tokenizer_fixtures, capacity_curve_max_blocks=0, isolation="thread"
        )
        with serve(create_app(config)) as kvern:
            off = _analytics(kvern)
    assert off["capacity_curve"] is None
    assert "capacity_curve_max_blocks" in off["capacity_curve_error"]
