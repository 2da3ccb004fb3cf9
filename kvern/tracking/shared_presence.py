"""Modelled presence shared by kvern instances: what this one routed, published; the others', kept.

Why: an instance knows only the prefixes it routed itself. A conversation
whose first turn went through instance A and whose second comes through B
(a round-robin load balancer in front of them) finds nothing in B's trie and
goes by load -- away from the replica holding its prefix. So each instance
publishes where it sent each prompt, and every instance keeps the others'
as presence (``routing.shared_state``).

The path of one turn, A to B::

    A tracking thread: commit (prompt -> r1), later settle (prompt + answer -> r1)
      -> publish(): bytes of the ids into a bounded queue (full: dropped, counted)
    A writer thread: chain hashes at r1's block size -> XADD P:presence MAXLEN ~ N
    B reader thread: XREAD P:presence (blocking, with a deadline)
      -> ChainIndex.add(model, r1, hashes), an LRU per (model, upstream)
    B tracking thread, next turn: PresenceBook.cached() asks held_tokens(model, r1, ids)
      -> turn 1's blocks lead turn 2's chain -> r1 holds them -> routed to r1

Stream entry fields: ``i`` (the publishing instance; readers skip their
own), ``m`` model, ``u`` upstream, ``b`` block size, ``h`` the chain hashes
back to back. A new or restarted instance reads the stream from its start
(what MAXLEN kept), and a restarted store (a new ``run_id``) is read from
its start again.

Threads: the tracking thread only copies ids into the queue and looks hashes
up in memory; the writer and reader are daemon threads (see
:mod:`kvern.routing.shared_state`), so a store that is down or slow never
reaches it. While the reader is stale, lookups still answer from what was
shared before (the replicas' caches did not empty when the store went
away) and are counted as ``fail_open``.
"""

from __future__ import annotations

import queue
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvern.config import RoutingConfig
from kvern.routing.block_chains import ChainIndex, chain_hashes, split_hashes, token_bytes
from kvern.routing.book import PresenceBook
from kvern.routing.presence_match import UpstreamCache
from kvern.routing.shared_state import LinkThread, instance_id, link_view

# Updates waiting for the writer at most (each holds one prompt's ids).
QUEUE_SIZE = 256
# Updates sent per pipelined round trip.
_BATCH = 64
# How long the reader's XREAD waits on the server for new entries (ms), at
# most: a quarter of shared_state_stale_ms, so an idle stream is never stale.
_BLOCK_MS = 200
# Entries read per XREAD at most.
_READ_COUNT = 256


def _block_ms(config: RoutingConfig) -> int:
    return max(10, min(_BLOCK_MS, int(config.shared_state_stale_ms / 4)))


@dataclass(frozen=True, slots=True)
class _Update:
    model: str
    upstream: str
    block_size: int
    data: bytes  # the ids, as block_chains.token_bytes


class _Writer(LinkThread):
    """Hashes queued updates and appends them to the stream, a batch per round trip."""

    def __init__(self, config: RoutingConfig, owner: SharedPresence) -> None:
        super().__init__(config, name="kvern-shared-presence-out")
        self._owner = owner
        self._idle_s = _block_ms(config) / 1000.0
        self._maxlen = config.shared_state_stream_maxlen
        self.published = 0  # updates appended to the stream
        self.failed = 0  # updates lost with a failed round trip

    def step(self, client: Any) -> None:
        owner = self._owner
        try:
            batch = [owner.queue.get(timeout=self._idle_s)]
        except queue.Empty:
            return
        while len(batch) < _BATCH:
            try:
                batch.append(owner.queue.get_nowait())
            except queue.Empty:
                break
        pipe = client.pipeline(transaction=False)
        for u in batch:
            hashes = b"".join(chain_hashes(u.data, u.block_size))
            if not hashes:
                continue  # shorter than a block: nothing a replica reuses
            fields = {"i": owner.instance, "m": u.model, "u": u.upstream, "b": u.block_size}
            pipe.xadd(owner.stream, {**fields, "h": hashes}, maxlen=self._maxlen, approximate=True)
        try:
            pipe.execute()
        except Exception:
            self.failed += len(batch)
            raise
        self.published += len(batch)


class _Reader(LinkThread):
    """Follows the stream and adds the other instances' chains to the index."""

    def __init__(self, config: RoutingConfig, owner: SharedPresence) -> None:
        self._block_ms = _block_ms(config)
        super().__init__(config, name="kvern-shared-presence-in", read_s=self._block_ms / 1000.0)
        self._owner = owner
        self._last_id: bytes | str = "0-0"
        self._run_id: str | None = None
        self.received = 0  # other instances' entries read
        self.skipped = 0  # of those, not kept: unknown upstream, other block size, bad entry

    def on_connect(self, client: Any) -> None:
        """A store that restarted (another run id) holds a new stream: read it from the start."""
        info = client.info("server")
        run_id = info.get("run_id") if isinstance(info, dict) else None
        if run_id != self._run_id:
            self._run_id = run_id
            self._last_id = "0-0"

    def step(self, client: Any) -> None:
        owner = self._owner
        got = client.xread({owner.stream: self._last_id}, count=_READ_COUNT, block=self._block_ms)
        streams = got.items() if isinstance(got, dict) else (got or [])
        for _, entries in streams:
            for entry_id, fields in entries:
                self._last_id = entry_id
                self._apply(fields)

    def _apply(self, fields: dict[bytes, bytes]) -> None:
        owner = self._owner
        try:
            if fields[b"i"].decode() == owner.instance:
                return
            self.received += 1
            model, upstream = fields[b"m"].decode(), fields[b"u"].decode()
            block_size = int(fields[b"b"])
            hashes = split_hashes(fields[b"h"])
        except (KeyError, ValueError, UnicodeDecodeError):
            self.skipped += 1
            return
        if not owner.index.add(model, upstream, block_size, hashes):
            self.skipped += 1


class SharedPresence:
    """Other instances' routing as presence (``PresenceBook.shared_source``); ours, published."""

    def __init__(
        self,
        config: RoutingConfig,
        caches: Iterable[UpstreamCache],
        *,
        instance: str | None = None,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.instance = instance or instance_id()
        self.stream = f"{config.shared_state_prefix}:presence"
        self.index = ChainIndex(caches)
        self.queue: queue.Queue[_Update] = queue.Queue(maxsize=queue_size)
        self.dropped = 0  # updates not queued: the queue was full (the writer fell behind)
        self.fail_open = 0  # lookups made while the reader was stale
        self._stale_s = config.shared_state_stale_ms / 1000.0
        self._writer = _Writer(config, self)
        self._reader = _Reader(config, self)

    @classmethod
    def attach(cls, config: RoutingConfig, book: PresenceBook | None) -> SharedPresence | None:
        """The shared presence for ``book`` (its ``shared_source``), or None when off.

        None too without a book: with one upstream there is no routing to share.
        """
        if book is None or config.shared_state is None:
            return None
        shared = cls(config, book.caches.values())
        book.shared_source = shared
        return shared

    def start(self) -> None:
        self._writer.start()
        self._reader.start()

    def close(self) -> None:
        """Stop both threads (each within one deadline); what is still queued is not sent."""
        self._writer.close()
        self._reader.close()

    # -- the tracking thread -------------------------------------------------------

    def held_tokens(self, model: str, upstream: str, ids: Sequence[int]) -> int | None:
        """What other instances sent to ``upstream`` of this prompt's prefix (tokens)."""
        if self._reader.age_s() > self._stale_s:
            self.fail_open += 1
        return self.index.held_tokens(model, upstream, ids)

    def drop_upstream(self, upstream: str) -> None:
        """``upstream`` went down (a restart empties its cache): forget what others sent there."""
        self.index.drop_upstream(upstream)

    def publish(self, model: str, upstream: str, ids: Sequence[int]) -> None:
        """This instance sent (or served) ``ids`` on ``upstream``: queue it, never wait."""
        cache = self.index.caches.get(upstream)
        if cache is None or len(ids) < cache.block_size:
            return
        try:
            self.queue.put_nowait(_Update(model, upstream, cache.block_size, token_bytes(ids)))
        except queue.Full:
            self.dropped += 1

    # -- reporting -----------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        """For ``/health``: the reader's link (staleness is its), both threads' counters."""
        reader, writer = self._reader, self._writer
        dropped = self.dropped + writer.failed
        out = link_view(reader, self._stale_s, fail_open=self.fail_open, dropped=dropped)
        out["connected"] = reader.stats.connected and writer.stats.connected
        out["errors"] += writer.stats.errors
        out["reconnects"] += writer.stats.reconnects
        out["last_error"] = reader.stats.last_error or writer.stats.last_error
        out.update(
            instance=self.instance,
            published=writer.published,
            queued=self.queue.qsize(),
            received=reader.received,
            skipped=reader.skipped,
            **self.index.stats(),
        )
        return out
