"""Non-prefix chunk reuse (opt-in): stored blocks found again after a different prefix.

Why: a RAG prompt puts the same document after a different question or
system prompt. Prefix reuse ends where the prompts part, so the document is
computed again although its blocks are in the store. Here a stored run of
blocks is found anywhere in the rest of the prompt, its keys turned from the
positions they were computed at to the ones they now take, and only the
first ``recompute_tokens`` after each seam are computed again (KVBoost's
"selective" recompute): those tokens attend to the new context, and later
ones see them.

What it costs, and why it is opt-in: a reused chunk's KV was computed
attending to its *old* context, not the new one, so the answer can differ
from full prefill (``bench/engine.py`` measures how often). Tokens computed
after a seam attend to that approximate KV, so the engine stores blocks
only up to the first seam: the block store's entries stay exact, and prefix
reuse stays greedy-identical.

Finding a run: every stored block is indexed by its own tokens (not by its
chained hash); the prompt's remaining tokens are scanned at every offset for
a block-long window found in the index, and a hit is extended block by block
along the stored sequence it came from (the next block's chained hash, from
the hit's). Runs shorter than ``min_run_tokens`` are not worth a seam.

Positions: rotary embeddings turn a key at position ``p`` by ``p x freq``;
turning it again by ``(p' - p) x freq`` gives exactly the key at ``p'``
(rotations compose), for models whose rotary frequencies do not depend on
the position (default, linear and Llama-3 RoPE scaling; not dynamic NTK).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvern.engine.kv_codec import EncodedBlock
from kvern.engine.store import BlockStore
from kvern.routing.block_chains import ChainHash, chain_hashes, token_bytes

_COMPOSABLE_ROPE = {None, "default", "linear", "llama3"}
# Stored sequences remembered per block content (the newest win).
_PER_KEY = 4


@dataclass(slots=True)
class ChunkRun:
    """A run of stored blocks reused at a new place in the prompt."""

    start: int  # first token of the run in the new prompt
    end: int  # one past its last token
    old_start: int  # where its first token stood when it was computed
    blocks: list[EncodedBlock]


class ChunkIndex:
    """Stored blocks by their own tokens, for finding them after another prefix."""

    def __init__(
        self, store: BlockStore, *, recompute_tokens: int = 16, min_run_tokens: int = 64
    ) -> None:
        if recompute_tokens < 1:
            raise ValueError(f"chunk recompute_tokens must be >= 1, got {recompute_tokens}")
        self.store = store
        self.recompute_tokens = recompute_tokens
        self.min_run_tokens = max(min_run_tokens, recompute_tokens + store.block_tokens)
        self._by_tokens: dict[tuple[int, ...], list[ChainHash]] = {}

    def add(self, tokens: Sequence[int], hashes: Sequence[ChainHash]) -> None:
        """Index the sequence's full blocks (after the store holds them)."""
        size = self.store.block_tokens
        for i, h in enumerate(hashes):
            key = tuple(tokens[i * size : (i + 1) * size])
            known = self._by_tokens.setdefault(key, [])
            if h in known:
                continue
            known.append(h)
            if len(known) > _PER_KEY:
                del known[0]

    def find(self, tokens: Sequence[int], start: int, stop: int) -> list[ChunkRun]:
        """Runs of stored blocks inside ``tokens[start:stop]``, in order, not overlapping."""
        size = self.store.block_tokens
        runs: list[ChunkRun] = []
        i = start
        while i + size <= stop:
            best: tuple[int, int, list[ChainHash]] | None = None
            for h in self._live(tuple(tokens[i : i + size])):
                chain = [h]
                j = i + size
                while j + size <= stop:
                    (nxt,) = chain_hashes(token_bytes(tokens[j : j + size]), size, parent=chain[-1])
                    if nxt not in self.store:
                        break
                    chain.append(nxt)
                    j += size
                old = self.store.position_of(h)
                if old is not None and (best is None or j - i > best[0] - i):
                    best = (j, old, chain)
            if best is not None and best[0] - i >= self.min_run_tokens:
                end, old, chain = best
                runs.append(ChunkRun(i, end, old, self.store.use(chain)))
                i = end
            else:
                i += 1
        return runs

    def _live(self, key: tuple[int, ...]) -> list[ChainHash]:
        known = self._by_tokens.get(key)
        if not known:
            return []
        alive = [h for h in known if h in self.store]
        if len(alive) != len(known):
            if alive:
                self._by_tokens[key] = alive
            else:
                del self._by_tokens[key]
        return alive


def check_rope(config: object) -> None:
    """Refuse a model whose rotary positions cannot be corrected by one more rotation."""
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
    if kind not in _COMPOSABLE_ROPE:
        raise ValueError(f"chunk reuse needs position-independent RoPE frequencies, not {kind!r}")


def rotate_keys(keys: torch.Tensor, shift: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys ``[..., tokens, head_dim]`` computed at positions p, as if computed at p + shift."""
    angles = float(shift) * inv_freq.to(torch.float64)
    emb = torch.cat((angles, angles))
    cos, sin = emb.cos().to(keys.dtype), emb.sin().to(keys.dtype)
    half = keys.shape[-1] // 2
    rotated = torch.cat((-keys[..., half:], keys[..., :half]), dim=-1)
    return keys * cos + rotated * sin
