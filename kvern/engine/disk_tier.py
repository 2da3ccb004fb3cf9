"""The cold tier: evicted blocks in one preallocated file, with an index that survives restarts.

Why one file of equal slots: every block of one model, block size and
``kv_bits`` encodes to the same number of bytes, so the file is an array of
slots; writing a block is one ``pwrite`` at ``slot * slot_bytes`` and
reading it one ``pread``, with no allocator and no fragmentation. The file
is created at its full size (``disk_bytes``) up front, so a full disk shows
at start, not mid-request.

The index (``index.json``: hash -> slot, parent hash) is rewritten
atomically (write, then rename) at most every ``flush_s`` seconds and on
close; the folder's name carries the model's fingerprint, block size and
bits, so a restart of the same engine finds its blocks again and another
model never reads them. A block written after the last index flush is lost
by a crash, never misread: the index only names slots written before it.

When the file is full the least recently used slot is reused. A block's
children may outlive it on disk; a lookup walks from the root, so they are
not reached until their parent is stored again, and age out.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from kvern.engine.kv_codec import (
    BlockShape,
    EncodedBlock,
    KvBits,
    encoded_bytes,
    from_bytes,
    to_bytes,
)
from kvern.routing.block_chains import ChainHash


class DiskTier:
    """Blocks by hash in ``folder/blocks.bin`` (slots) and ``folder/index.json``."""

    def __init__(
        self,
        folder: Path,
        shape: BlockShape,
        bits: KvBits,
        disk_bytes: int,
        *,
        dtype: torch.dtype = torch.float32,
        flush_s: float = 2.0,
    ) -> None:
        self.folder = folder
        self.shape = shape
        self.bits = bits
        self.dtype = dtype  # the model's compute dtype (16-bit blocks keep a 16-bit one)
        self.slot_bytes = encoded_bytes(shape, bits, dtype)
        self.num_slots = disk_bytes // self.slot_bytes
        if self.num_slots < 1:
            raise ValueError(f"disk_bytes {disk_bytes} holds no block of {self.slot_bytes} bytes")
        self.flush_s = flush_s
        folder.mkdir(parents=True, exist_ok=True)
        self._path = folder / "blocks.bin"
        self._index_path = folder / "index.json"
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        size = self.num_slots * self.slot_bytes
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)  # sparse here; posix_fallocate would reserve it
            try:
                os.posix_fallocate(self._fd, 0, size)
            except (AttributeError, OSError):
                pass
        # hash -> (slot, parent), least recently used first.
        self._slots: OrderedDict[ChainHash, tuple[int, ChainHash | None]] = OrderedDict()
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._dirty = False
        self._flushed_s = time.monotonic()
        self.reads = 0
        self.writes = 0
        self._load_index()

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, block_hash: ChainHash) -> bool:
        return block_hash in self._slots

    def put(self, block_hash: ChainHash, parent: ChainHash | None, block: EncodedBlock) -> None:
        if block_hash in self._slots:
            self._slots.move_to_end(block_hash)
            return
        data = to_bytes(block)
        assert len(data) == self.slot_bytes, (len(data), self.slot_bytes)
        if self._free:
            slot = self._free.pop()
        else:
            _, (slot, _) = self._slots.popitem(last=False)
        os.pwrite(self._fd, data, slot * self.slot_bytes)
        self._slots[block_hash] = (slot, parent)
        self.writes += 1
        self._dirty = True
        self._maybe_flush()

    def take(self, block_hash: ChainHash) -> EncodedBlock | None:
        found = self._slots.get(block_hash)
        if found is None:
            return None
        self._slots.move_to_end(block_hash)
        data = os.pread(self._fd, self.slot_bytes, found[0] * self.slot_bytes)
        self.reads += 1
        return from_bytes(data, self.shape, self.bits, self.dtype)

    def facts(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "slots": self.num_slots,
            "slot_bytes": self.slot_bytes,
            "blocks": len(self._slots),
            "reads": self.reads,
            "writes": self.writes,
        }

    def flush(self) -> None:
        """Write the index (atomically) if it changed."""
        if not self._dirty:
            return
        entries = [
            [h.hex(), slot, parent.hex() if parent is not None else None]
            for h, (slot, parent) in self._slots.items()
        ]
        body = {
            "slot_bytes": self.slot_bytes,
            "num_slots": self.num_slots,
            "blocks": entries,
        }
        tmp = self._index_path.with_suffix(".tmp")
        os.fsync(self._fd)  # the slots the index names are on disk before it is
        tmp.write_text(json.dumps(body))
        os.replace(tmp, self._index_path)
        self._dirty = False
        self._flushed_s = time.monotonic()

    def close(self) -> None:
        self.flush()
        os.close(self._fd)

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._flushed_s >= self.flush_s:
            self.flush()

    def _load_index(self) -> None:
        if not self._index_path.exists():
            return
        try:
            body = json.loads(self._index_path.read_text())
        except (OSError, ValueError):
            return  # an unreadable index: start empty (the slots are overwritten)
        if body.get("slot_bytes") != self.slot_bytes or body.get("num_slots") != self.num_slots:
            return  # another layout (a changed disk_bytes): start empty
        used: set[int] = set()
        for h, slot, parent in body.get("blocks", []):
            if not 0 <= slot < self.num_slots or slot in used:
                continue
            used.add(slot)
            self._slots[ChainHash(bytes.fromhex(h))] = (
                slot,
                ChainHash(bytes.fromhex(parent)) if parent else None,
            )
        self._free = [s for s in range(self.num_slots - 1, -1, -1) if s not in used]
