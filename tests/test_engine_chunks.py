"""Non-prefix chunk reuse: a stored document found after another prefix, its keys moved exactly."""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch", reason="the engine extra (torch) is not installed")

from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from kvern.engine.chunks import ChunkIndex, rotate_keys  # noqa: E402
from kvern.engine.runner import Runner, greedy  # noqa: E402
from kvern.engine.store import BlockStore  # noqa: E402
from tests.engine_model import smollm2  # noqa: E402

pytestmark = pytest.mark.slow

DOCUMENT = (
    "Section 4.2 of the lease: the tenant pays the rent on the first day of each month, by bank "
    "transfer, and the landlord repairs the roof, the heating and the water pipes within a week. "
) * 6


def ids(messages: list[dict[str, str]]) -> list[int]:
    return list(
        smollm2().tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    )


def rag(system: str, question: str) -> list[int]:
    return ids(
        [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Document:\n{DOCUMENT}\nQuestion: {question}"},
        ]
    )


def generate(
    runner: Runner, prompt: list[int], reuse: bool = True, new: int = 12
) -> tuple[list[int], int, int]:
    g = greedy(runner, prompt, new, reuse=reuse)
    return g.tokens, g.reused_tokens, g.chunk_reused_tokens


def test_moving_a_key_by_a_rotation_equals_computing_it_at_the_new_place() -> None:
    model = smollm2().model
    rotary = model.model.rotary_emb
    raw = torch.randn(1, 3, 20, 64)
    at = lambda start: rotary(raw, torch.arange(start, start + 20)[None])  # noqa: E731
    cos_a, sin_a = at(37)
    cos_b, sin_b = at(37 + 211)
    keys_a, _ = apply_rotary_pos_emb(raw, raw, cos_a, sin_a)
    keys_b, _ = apply_rotary_pos_emb(raw, raw, cos_b, sin_b)
    moved = rotate_keys(keys_a, 211, rotary.inv_freq)
    assert torch.allclose(moved, keys_b, atol=1e-4)


def test_a_document_after_another_system_prompt_is_reused_past_a_recomputed_seam() -> None:
    model = smollm2().model
    store = BlockStore(16, 1 << 30, clock=time.monotonic)
    chunks = ChunkIndex(store, recompute_tokens=16)
    runner = Runner(model, store, 16, chunks=chunks)
    first = rag("You are a careful legal assistant.", "Who repairs the roof?")
    second = rag(
        "You answer questions about documents for a property company. Quote the document.",
        "When is the rent due?",
    )
    generate(runner, first)
    stored_before = store.num_blocks
    _, prefix, moved = generate(runner, second)
    # The system prompts differ early: prefix reuse stops there; the document is found.
    assert prefix < 48
    assert moved >= len(smollm2().tokenizer(DOCUMENT)["input_ids"]) - 64
    # Past the seam its KV is approximate: none of it joined the store.
    assert store.num_blocks - stored_before <= (len(second) - moved) // 16
    # A third request re-sending the second prompt: prefix reuse is exact only up to the
    # seam, and what it generates equals full prefill there (greedy identity kept).
    plain = Runner(model, None, 32)
    again, prefix_again, _ = generate(Runner(model, store, 16), second)
    assert again == generate(plain, second, reuse=False)[0]
    assert prefix <= prefix_again <= len(second) - moved


def test_runs_shorter_than_the_minimum_are_computed() -> None:
    store = BlockStore(16, 1 << 30, clock=time.monotonic)
    runner = Runner(smollm2().model, store, 16, chunks=ChunkIndex(store, min_run_tokens=10_000))
    generate(runner, rag("A.", "Who repairs the roof?"), new=1)
    _, _, moved = generate(runner, rag("B, a different start.", "When?"), new=1)
    assert moved == 0
