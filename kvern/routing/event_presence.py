"""One upstream's prefix cache as its own KV events tell it: exact, where presence is a model.

Why from events: an engine that publishes ``BlockStored``/``BlockRemoved``
says which blocks it holds, so kvern need not guess its capacity or eviction
order. Why keyed by token ids, not by the engine's hash: kvern cannot (and
need not) reproduce vLLM's hash (sha256 over a pickled tuple, seeded per
process, with LoRA, multimodal and salt keys). Like llm-d, Dynamo and SMG,
each stored block is filed under what kvern *can* compute from a prompt — its
parent and its own token ids — and the engine's hash is kept only to find the
block again when it is removed, and as the parent key of its children::

    content key (parent engine hash | None, lora, extra key, token ids of the block)
                        -> engine hash
    engine hash -> _Block(parent hash, content key)

    prompt [t0 .. t127 | t128 .. t255 | t256 ..]   (block_size 128, full blocks only)
             key(None, b0) -> h0 ; key(h0, b1) -> h1 ; key(h1, b2) -> miss: 256 held

Removing a block removes its content key, so the walk stops there and what
hangs under it stops matching without being touched (vLLM's own lookup stops
at the first missing block the same way); a child whose parent comes back
with the same hash matches again, as in vLLM.

Pure and synchronous: the subscriber calls :meth:`EventPresence.apply` on the
loop; a caller on another thread holds one lock around both sides (see
:mod:`kvern.tracking.kv_feed`).

Namespaces: a LoRA's blocks are filed under its ``lora_name`` and found only
when asked for that name. A block with extra keys (vLLM's ``cache_salt``,
multimodal inputs) is filed under them; kvern asks with none, so a salted or
multimodal prompt never matches from events: held 0, an under-estimate, never
an over-estimate. Only blocks of ``mediums`` (the GPU tier, or unspecified) and of KV
group 0 count: a CPU-offloaded block is not a prefix-cache hit of the engine.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from kvern.upstream.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineBlockHash,
    KvEventBatch,
)

# (parent engine hash, lora name, extra key, token ids of the block)
_ContentKey = tuple[EngineBlockHash | None, str | None, Any, tuple[int, ...]]

DEFAULT_MEDIUMS: frozenset[str | None] = frozenset({"GPU", None})


@dataclass(slots=True)
class _Block:
    parent: EngineBlockHash | None  # the engine's hash of the block before; None at the start
    key: _ContentKey  # where it is filed in the content map
    stored_s: float  # when its BlockStored was received (the caller's clock); 0 if not given


@dataclass(slots=True)
class EventPresenceStats:
    """Counters for metrics; ``blocks_held`` is the live count."""

    blocks_held: int = 0
    stored: int = 0  # blocks stored (a re-store of a held hash counts again)
    removed: int = 0  # blocks removed that were held
    unknown_removed: int = 0  # removals of blocks never seen stored (joined late, a gap)
    cleared: int = 0  # AllBlocksCleared events
    resets: int = 0  # publisher restarts: everything dropped
    gaps: int = 0  # holes in the stream the replay could not fill
    fallbacks: int = 0  # times presence stopped being exact (a gap, a lost connection)
    replays: int = 0  # replays that filled a hole
    ignored: int = 0  # events of another medium, KV group or block size
    dropped_over_bound: int = 0  # blocks dropped because max_blocks was reached


class EventPresence:
    """What one upstream holds, from its events; answers how many leading tokens it has.

    ``exact`` says whether the answers can be trusted; the caller falls back
    to the model while it is False. It is False

    * before the first batch: an engine that was running before kvern
      subscribed may hold blocks no event here told of (a replay from 0, done
      by the subscriber at the first batch, makes it whole);
    * after a gap the replay could not fill (a lost ``BlockStored`` or
      ``BlockRemoved`` makes answers wrong either way), until a clear or a
      reset starts over from a known state;
    * after the connection to the publisher dropped, until the next batch
      says whether the same engine goes on (:meth:`apply`) or a new one
      started (:meth:`reset`).
    """

    def __init__(
        self,
        *,
        max_blocks: int = 1_000_000,
        mediums: Collection[str | None] = DEFAULT_MEDIUMS,
    ) -> None:
        if max_blocks <= 0:
            raise ValueError(f"max_blocks: {max_blocks}, must be positive")
        self.block_size: int | None = None  # learned from the first BlockStored
        self.lora_names: set[str] = set()  # LoRA names seen in BlockStored
        self._whole = True  # no batch lost since the last clear or reset
        self._known = False  # a batch seen since the start or the last disconnect
        self.stats = EventPresenceStats()
        self._max_blocks = max_blocks
        self._mediums = frozenset(mediums)
        self._blocks: dict[EngineBlockHash, _Block] = {}  # insertion order: oldest stored first
        self._by_content: dict[_ContentKey, EngineBlockHash] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def exact(self) -> bool:
        """Whether :meth:`held_tokens` is the engine's truth now (see the class)."""
        return self._whole and self._known

    # --- feeding -------------------------------------------------------------

    def apply(self, batch: KvEventBatch, received_s: float = 0.0) -> None:
        """Apply one batch's events in order (the subscriber's ``on_batch``).

        ``received_s``: when it arrived, so that :meth:`held_tokens` can answer
        as of an earlier moment (see there).
        """
        self._known = True
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._store(event, received_s)
            elif isinstance(event, BlockRemoved):
                self._remove(event)
            elif isinstance(event, AllBlocksCleared):
                self.stats.cleared += 1
                self._clear()
        self.stats.blocks_held = len(self._blocks)

    def reset(self) -> None:
        """The publisher restarted (a new engine holds nothing): drop everything."""
        self.stats.resets += 1
        self._clear()
        self._known = True
        self.stats.blocks_held = 0

    def note_gap(self, first_seq: int, last_seq: int) -> None:
        """Batches ``first_seq..last_seq`` are lost (the subscriber's ``on_gap``)."""
        self.stats.gaps += 1
        if self.exact:
            self.stats.fallbacks += 1
        self._whole = False

    def note_disconnect(self) -> None:
        """The publisher went away (the subscriber's ``on_disconnect``): in doubt until it speaks.

        Nothing is dropped: the same engine going on (a network blip) keeps
        all of it right; a restarted one is told by its numbering and reset.
        """
        if self.exact:
            self.stats.fallbacks += 1
        self._known = False

    def note_replay(self, num_batches: int = 1) -> None:
        """A replay filled (part of) a hole (the subscriber's ``on_replay``): counted only."""
        self.stats.replays += 1

    def _clear(self) -> None:
        self._blocks.clear()
        self._by_content.clear()
        self.lora_names.clear()
        self._whole = True

    def _counts(self, medium: str | None, group_idx: int | None) -> bool:
        return medium in self._mediums and group_idx in (None, 0)

    def _store(self, event: BlockStored, received_s: float) -> None:
        if not self._counts(event.medium, event.group_idx):
            self.stats.ignored += 1
            return
        if self.block_size is None:
            self.block_size = event.block_size
        size = self.block_size
        if event.block_size != size or len(event.token_ids) < len(event.block_hashes) * size:
            self.stats.ignored += 1
            return
        if event.lora_name is not None:
            self.lora_names.add(event.lora_name)
        parent = event.parent_block_hash
        for index, engine_hash in enumerate(event.block_hashes):
            tokens = event.token_ids[index * size : (index + 1) * size]
            extra = event.extra_keys[index] if event.extra_keys else None
            key: _ContentKey = (parent, event.lora_name, extra, tokens)
            self._drop(engine_hash)
            self._blocks[engine_hash] = _Block(parent=parent, key=key, stored_s=received_s)
            self._by_content[key] = engine_hash
            self.stats.stored += 1
            parent = engine_hash
        while len(self._blocks) > self._max_blocks:
            oldest = next(iter(self._blocks))
            self._drop(oldest)
            self.stats.dropped_over_bound += 1

    def _remove(self, event: BlockRemoved) -> None:
        if not self._counts(event.medium, event.group_idx):
            self.stats.ignored += 1
            return
        for engine_hash in event.block_hashes:
            if self._drop(engine_hash):
                self.stats.removed += 1
            else:
                self.stats.unknown_removed += 1

    def _drop(self, engine_hash: EngineBlockHash) -> bool:
        block = self._blocks.pop(engine_hash, None)
        if block is None:
            return False
        if self._by_content.get(block.key) == engine_hash:
            del self._by_content[block.key]
        return True

    # --- asking --------------------------------------------------------------

    def held_tokens(
        self,
        token_ids: Sequence[int],
        *,
        lora_name: str | None = None,
        stored_before_s: float | None = None,
    ) -> int:
        """How many leading tokens of ``token_ids`` the upstream holds, in whole blocks.

        Only full blocks are ever cached, so a prompt's tail shorter than a
        block never counts. 0 before the first ``BlockStored`` (no block size).
        ``stored_before_s``: count only blocks received by then. A request's
        prediction may run after the engine already served it (routing's
        question came too late, or was never asked), and by then the request's
        own blocks are here: what it could reuse is what was held when it arrived.
        """
        size = self.block_size
        if size is None:
            return 0
        tokens = tuple(token_ids)
        parent: EngineBlockHash | None = None
        held = 0
        for start in range(0, len(tokens) - size + 1, size):
            found = self._by_content.get((parent, lora_name, None, tokens[start : start + size]))
            if found is None:
                break
            if stored_before_s is not None and self._blocks[found].stored_s > stored_before_s:
                break
            parent = found
            held += size
        return held

    def check_invariants(self) -> None:
        """Recount what is kept incrementally (for tests): every map entry has its block."""
        for key, engine_hash in self._by_content.items():
            assert self._blocks[engine_hash].key == key, (key, engine_hash)
        for engine_hash, block in self._blocks.items():
            assert block.key[0] == block.parent
            holder = self._by_content.get(block.key)
            # Two hashes for one content key (a salt kvern does not see): the later wins.
            assert holder is None or holder in self._blocks, engine_hash
        assert self.stats.blocks_held == len(self._blocks)
