"""The model's forward passes: prefill with reuse, one decode step, storing a sequence's blocks.

Why the request's cache is a copy: a request writes the stored blocks it
reuses (decoded to the model's dtype) into a cache of its own
(:mod:`kvern.engine.kv_cache`) and grows it as it computes; the store keeps
its own encoded blocks. So eviction never pulls tensors out from under a
running request and the store needs no pins, at the price of one copy of the
reused prefix per request (far cheaper than computing it).

The reuse rule is vLLM's and kvern's ``radix`` cache model's: the longest
run of the prompt's leading full blocks found in the store, never the block
that holds the prompt's last token (its logits give the first output
token, so it is always computed). After prefill the prompt's full blocks are
stored; when the request ends, so are those of prompt + answer but its last
sampled token (which never went through the model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from kvern.engine.chunks import ChunkIndex, ChunkRun, check_rope, rotate_keys
from kvern.engine.kv_cache import GrowingLayer, new_cache
from kvern.engine.kv_codec import BlockShape, EncodedBlock, KvBits, decode, encode
from kvern.engine.store import BlockStore
from kvern.routing.block_chains import ChainHash, chain_hashes, token_bytes

# Tokens of answer a request's KV buffers have room for before they grow.
_DECODE_ROOM = 256


@dataclass(slots=True)
class SequenceState:
    """One request's state between steps: its tokens so far and its KV cache."""

    tokens: list[int]  # prompt, then each token fed back through the model
    cache: DynamicCache
    reused_tokens: int  # prompt tokens taken from the store as a prefix, not computed
    prompt_tokens: int
    chunk_reused_tokens: int = 0  # prompt tokens taken from stored chunks after a seam
    # Tokens whose KV is exactly full prefill's (None: all); blocks past it are not stored.
    exact_tokens: int | None = None
    # Chained hashes of the prompt's full blocks (finish extends them over the answer).
    hashes: list[ChainHash] = field(default_factory=list)


def block_shape(model: PreTrainedModel, block_tokens: int) -> BlockShape:
    """The shape of one block of ``model``'s KV; refuses a model this store cannot serve."""
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(
            "the engine's block store needs full attention in every layer; this model has "
            f"{sorted(set(layer_types))}"
        )
    heads = config.num_attention_heads
    return BlockShape(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        block_tokens=block_tokens,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
    )


class Runner:
    """Runs ``model`` one request step at a time, reusing and filling ``store``."""

    def __init__(
        self,
        model: PreTrainedModel,
        store: BlockStore | None,
        kv_bits: KvBits,
        chunks: ChunkIndex | None = None,
    ) -> None:
        self.model = model
        self.store = store
        self.kv_bits = kv_bits
        self.chunks = chunks
        self._inv_freq: torch.Tensor | None = None
        if chunks is not None:
            check_rope(model.config.get_text_config())
            rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
            inv_freq = getattr(rotary, "inv_freq", None)
            if not isinstance(inv_freq, torch.Tensor):
                raise ValueError("chunk reuse needs a model with rotary position embeddings")
            self._inv_freq = inv_freq.detach().float().cpu()
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.shape = block_shape(model, store.block_tokens if store is not None else 1)

    @property
    def block_tokens(self) -> int:
        return self.shape.block_tokens

    def hashes(self, tokens: Sequence[int]) -> list[ChainHash]:
        """Chained hashes of ``tokens``' full blocks, as the store and kvern key them."""
        return chain_hashes(token_bytes(tokens), self.block_tokens)

    @torch.inference_mode()
    def prefill(
        self, prompt: Sequence[int], reuse: bool = True
    ) -> tuple[SequenceState, torch.Tensor]:
        """Compute what the store lacks of ``prompt``; returns its state and last logits."""
        if not prompt:
            raise ValueError("an empty prompt")
        tokens = list(prompt)
        hashes = self.hashes(tokens) if self.store is not None else []
        usable = (len(tokens) - 1) // self.block_tokens
        found: list[EncodedBlock] = []
        if self.store is not None and reuse:
            found = self.store.lookup(hashes[:usable], tokens)
        cache = new_cache(
            self.model.config,
            self.shape.num_layers,
            len(tokens) + _DECODE_ROOM,
            self.dtype,
            self.device,
        )
        reused = len(found) * self.block_tokens
        if found:
            self._load(cache, found)
        state = SequenceState(tokens, cache, reused, len(tokens), hashes=hashes)
        runs = self.chunks.find(tokens, reused, len(tokens) - 1) if self.chunks and reuse else []
        position = reused
        for run in runs:
            seam = run.start + self.chunks.recompute_tokens  # type: ignore[union-attr]
            self._forward(cache, tokens[position:seam])
            self._load_moved(cache, run, skip=seam - run.start)
            state.chunk_reused_tokens += run.end - seam
            if state.exact_tokens is None:
                state.exact_tokens = seam
            position = run.end
        logits = self._forward(cache, tokens[position:])
        if self.store is not None:
            self._store(state, hashes)
            if self.chunks is not None:
                self.chunks.add(tokens, hashes[: self._storable(state) // self.block_tokens])
        return state, logits

    def _forward(self, cache: DynamicCache, ids: list[int]) -> torch.Tensor:
        """Run ``ids`` after what ``cache`` holds; the last position's logits."""
        tensor = torch.tensor([ids], device=self.device)
        # Only the last position's logits are needed: the vocabulary projection of
        # every prompt position would be a fifth of a small model's prefill.
        out = self.model(input_ids=tensor, cache=cache, use_cache=True, logits_to_keep=1)
        logits: torch.Tensor = out.logits[0, -1].float()
        return logits

    def _load_moved(self, cache: DynamicCache, run: ChunkRun, skip: int) -> None:
        """Append a stored run's KV from token ``skip`` on, its keys turned to their new places."""
        assert self._inv_freq is not None
        keys, values = self._joined(run.blocks)
        keys = rotate_keys(keys[:, :, skip:].float(), run.start - run.old_start, self._inv_freq)
        self._write(cache, cache.get_seq_length(), keys, values[:, :, skip:])

    @torch.inference_mode()
    def step(self, state: SequenceState, token: int) -> torch.Tensor:
        """Feed the sampled ``token`` back; the logits for the next one."""
        ids = torch.tensor([[token]], device=self.device)
        out = self.model(input_ids=ids, cache=state.cache, use_cache=True)
        state.tokens.append(token)
        logits: torch.Tensor = out.logits[0, -1].float()
        return logits

    def finish(self, state: SequenceState) -> None:
        """The request ended: store the full blocks of all it fed through the model."""
        if self.store is not None:
            # The prompt's hashes were made at prefill; only the answer's are new.
            known = state.hashes
            data = token_bytes(state.tokens)
            if known:
                more = chain_hashes(data, self.block_tokens, start=len(known), parent=known[-1])
            else:
                more = chain_hashes(data, self.block_tokens)
            self._store(state, known + more)

    @staticmethod
    def _storable(state: SequenceState) -> int:
        """Tokens whose KV may be stored: all computed, up to the first chunk seam."""
        computed = state.cache.get_seq_length()
        return computed if state.exact_tokens is None else min(computed, state.exact_tokens)

    def _load(self, cache: DynamicCache, blocks: list[EncodedBlock]) -> None:
        """Decode the reused blocks into the request's buffers: one copy a layer."""
        keys, values = self._joined(blocks)
        self._write(cache, 0, keys, values)

    def _joined(self, blocks: list[EncodedBlock]) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' keys and values end to end, ``[layers, heads, tokens, head_dim]``.

        32- and 16-bit blocks are joined in their stored dtype (half the bytes
        at 16 bits) and converted as they are written; quantized ones are
        decoded first. A copy per block and layer would cost more in Python
        than in memory.
        """
        if blocks[0].bits in (32, 16):
            keys = torch.cat([b.keys[0] for b in blocks], dim=2)
            values = torch.cat([b.values[0] for b in blocks], dim=2)
        else:
            pairs = [decode(b, self.dtype) for b in blocks]
            keys = torch.cat([k for k, _ in pairs], dim=2)
            values = torch.cat([v for _, v in pairs], dim=2)
        return keys, values

    @staticmethod
    def _write(cache: DynamicCache, at: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put joined ``keys``/``values`` into every layer of ``cache`` from token ``at``."""
        for n, layer in enumerate(cache.layers):
            assert isinstance(layer, GrowingLayer)
            layer.write(at, keys[n].unsqueeze(0), values[n].unsqueeze(0))

    def _store(self, state: SequenceState, hashes: list[ChainHash]) -> None:
        assert self.store is not None
        size = self.block_tokens
        hashes = hashes[: self._storable(state) // size]
        layers = [(layer.keys, layer.values) for layer in state.cache.layers]  # type: ignore[union-attr]

        def encode_block(i: int) -> EncodedBlock:
            span = slice(i * size, (i + 1) * size)
            keys = torch.stack([k[0, :, span] for k, _ in layers]).cpu()  # type: ignore[index]
            values = torch.stack([v[0, :, span] for _, v in layers]).cpu()  # type: ignore[index]
            return encode(keys, values, self.kv_bits)

        self.store.put(hashes, state.tokens, encode_block)


@dataclass(slots=True)
class Greedy:
    """What :func:`greedy` generated, and what its prefill reused."""

    tokens: list[int]
    first_logits: torch.Tensor  # the prompt's last position: the first token's distribution
    reused_tokens: int
    chunk_reused_tokens: int


def greedy(runner: Runner, prompt: Sequence[int], new: int, *, reuse: bool = True) -> Greedy:
    """``new`` greedy tokens without the scheduler (tests and the quality bench compare these)."""
    state, logits = runner.prefill(prompt, reuse=reuse)
    first = logits.clone()
    out: list[int] = []
    for _ in range(new):
        out.append(int(logits.argmax()))
        logits = runner.step(state, out[-1])
    runner.finish(state)
    return Greedy(out, first, state.reused_tokens, state.chunk_reused_tokens)
