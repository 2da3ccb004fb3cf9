"""vLLM's KV cache events: the wire format (:mod:`.wire`) and a subscriber that follows it.

Why: an engine that publishes which blocks it stored and evicted tells kvern
its prefix cache exactly, where otherwise kvern can only model it.
"""

from kvern.upstream.kv_events.subscriber import KvEventSubscriber, SubscriberStats
from kvern.upstream.kv_events.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineBlockHash,
    KvEvent,
    KvEventBatch,
    KvEventDecodeError,
    decode_batch,
    decode_frames,
    encode_batch,
    encode_seq,
)

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EngineBlockHash",
    "KvEvent",
    "KvEventBatch",
    "KvEventDecodeError",
    "KvEventSubscriber",
    "SubscriberStats",
    "decode_batch",
    "decode_frames",
    "encode_batch",
    "encode_seq",
]
