"""What compact storage costs, measured in-process: KV error, greedy agreement, next-token KL.

Why in-process: the quality of 16/8/4-bit blocks is a property of the codec
and the model, not of HTTP; running the engine's :class:`Runner` directly
gives the logits to compare. For each bit width a fresh store serves the same
prompts in order (so later prompts reuse earlier ones' blocks); each prompt
is also computed whole, in float32 storage-free, as the reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvern.engine.kv_codec import decode, encode, encoded_bytes
from kvern.engine.runner import Runner, block_shape, greedy
from kvern.engine.store import BlockStore


@dataclass(slots=True)
class Quality:
    bits: int
    bytes_per_token: float  # stored KV per cached token
    prompts: int
    greedy_identical: int  # prompts whose greedy answer equals the reference's
    token_agreement: float  # share of answer tokens equal to the reference's, position by position
    max_kl: float  # KL(reference || reused) of the first answer token's distribution, worst prompt
    mean_kl: float
    max_abs_error: float  # largest |stored - computed| over every K and V number kept
    reused_tokens: int


def _greedy(
    runner: Runner, prompt: list[int], new: int, reuse: bool
) -> tuple[list[int], torch.Tensor, int]:
    g = greedy(runner, prompt, new, reuse=reuse)
    return g.tokens, g.first_logits, g.reused_tokens


def _max_codec_error(runner: Runner, prompt: list[int], bits: int, block: int) -> float:
    """Largest round-trip error of the prompt's full blocks' KV at ``bits``."""
    state, _ = runner.prefill(prompt, reuse=False)
    worst = 0.0
    layers = state.cache.layers
    for b in range(len(prompt) // block):
        span = slice(b * block, (b + 1) * block)
        keys = torch.stack([layer.keys[0, :, span] for layer in layers])  # type: ignore[union-attr,index]
        values = torch.stack([layer.values[0, :, span] for layer in layers])  # type: ignore[union-attr,index]
        k, v = decode(encode(keys, values, bits), keys.dtype)  # type: ignore[arg-type]
        worst = max(worst, float((k - keys).abs().max()), float((v - values).abs().max()))
    return worst


def measure(
    model: torch.nn.Module,
    prompts: list[list[int]],
    bits_list: list[int],
    *,
    block: int = 16,
    new: int = 16,
) -> list[Quality]:
    plain = Runner(model, None, 32)  # type: ignore[arg-type]
    reference = [_greedy(plain, p, new, reuse=False) for p in prompts]
    out: list[Quality] = []
    shape = block_shape(model, block)  # type: ignore[arg-type]
    dtype = next(model.parameters()).dtype
    for bits in bits_list:
        store = BlockStore(block, 1 << 31, clock=time.monotonic)
        runner = Runner(model, store, bits)  # type: ignore[arg-type]
        same = agree = total = reused = 0
        kls: list[float] = []
        for prompt, (want, want_logits, _) in zip(prompts, reference, strict=True):
            got, logits, n = _greedy(runner, prompt, new, reuse=True)
            reused += n
            same += got == want
            agree += sum(a == b for a, b in zip(got, want, strict=True))
            total += len(want)
            ref = torch.log_softmax(want_logits, -1)
            kls.append(float((ref.exp() * (ref - torch.log_softmax(logits, -1))).sum()))
        error = _max_codec_error(plain, prompts[-1], bits, block)
        out.append(
            Quality(
                bits=bits,
                bytes_per_token=encoded_bytes(shape, bits, dtype) / block,  # type: ignore[arg-type]
                prompts=len(prompts),
                greedy_identical=same,
                token_agreement=agree / total,
                max_kl=max(kls),
                mean_kl=sum(kls) / len(kls),
                max_abs_error=error,
                reused_tokens=reused,
            )
        )
    return out


@dataclass(slots=True)
class ChunkQuality:
    recompute_tokens: int
    prompts: int  # RAG prompts whose document came after another prefix
    greedy_identical: int
    token_agreement: float
    chunk_reused_tokens: int
    prompt_tokens: int
    prefill_ms_median: float  # in-process prefill with chunk reuse
    full_prefill_ms_median: float  # the same prompts computed whole


def measure_chunks(
    model: torch.nn.Module,
    warm: list[list[int]],
    prompts: list[list[int]],
    recompute: list[int],
    *,
    block: int = 16,
    new: int = 16,
) -> list[ChunkQuality]:
    """Each document stored once (``warm``), then asked after other prefixes (``prompts``)."""
    from kvern.engine.chunks import ChunkIndex

    plain = Runner(model, None, 32)  # type: ignore[arg-type]
    full_ms: list[float] = []
    reference = []
    for p in prompts:
        t = time.perf_counter()
        state, logits = plain.prefill(p, reuse=False)
        full_ms.append((time.perf_counter() - t) * 1000)
        want: list[int] = []
        for _ in range(new):
            want.append(int(logits.argmax()))
            logits = plain.step(state, want[-1])
        reference.append(want)
    out = []
    for r in recompute:
        store = BlockStore(block, 1 << 31, clock=time.monotonic)
        runner = Runner(model, store, 16, ChunkIndex(store, recompute_tokens=r))  # type: ignore[arg-type]
        for p in warm:
            _greedy(runner, p, 1, reuse=True)
        same = agree = total = moved = 0
        ms: list[float] = []
        for p, expected in zip(prompts, reference, strict=True):
            t = time.perf_counter()
            state, logits = runner.prefill(p)
            ms.append((time.perf_counter() - t) * 1000)
            got: list[int] = []
            for _ in range(new):
                got.append(int(logits.argmax()))
                logits = runner.step(state, got[-1])
            moved += state.chunk_reused_tokens
            same += got == expected
            agree += sum(a == b for a, b in zip(got, expected, strict=True))
            total += len(expected)
        out.append(
            ChunkQuality(
                recompute_tokens=r,
                prompts=len(prompts),
                greedy_identical=same,
                token_agreement=agree / total,
                chunk_reused_tokens=moved,
                prompt_tokens=sum(len(p) for p in prompts),
                prefill_ms_median=sorted(ms)[len(ms) // 2],
                full_prefill_ms_median=sorted(full_ms)[len(full_ms) // 2],
            )
        )
    return out
