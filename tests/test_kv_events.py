"""vLLM's KV events: decoding, the presence they give, and a stream with holes and restarts.

Why against a real vLLM: the wire format is vLLM's, and the point of the
index is to agree with what vLLM's prefix cache then serves
(``usage.prompt_tokens_details.cached_tokens``): that check, against a real
vLLM's own events, lives in ``tests/test_kv_events_vllm.py`` beside the
module's replicas (one vLLM start fewer). The holes and restarts are
scripted with a ZeroMQ publisher that behaves as vLLM's does (PUB frames,
ROUTER replay with the END_SEQ marker), because making a real engine drop a
batch on cue is not possible. The publisher is an XPUB, so a test waits for
the subscriber's subscription instead of sleeping past ZeroMQ's slow joiner.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq
import zmq.asyncio

from kvern.routing.event_presence import EventPresence
from kvern.upstream.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEventBatch,
    KvEventDecodeError,
    KvEventSubscriber,
    decode_batch,
    encode_batch,
    encode_seq,
)
from tests.kv_publisher import ScriptedPublisher, until
from tests.servers import free_port

BLOCK = 4


def stored(hashes: list[bytes], parent: bytes | None, tokens: list[int]) -> BlockStored:
    return BlockStored(
        block_hashes=tuple(hashes),
        parent_block_hash=parent,
        token_ids=tuple(tokens),
        block_size=BLOCK,
        medium="GPU",
        lora_name=None,
        extra_keys=None,
        group_idx=None,
    )


def removed(hashes: list[bytes]) -> BlockRemoved:
    return BlockRemoved(block_hashes=tuple(hashes), medium="GPU", group_idx=None)


def batch(seq: int, *events: BlockStored | BlockRemoved | AllBlocksCleared) -> KvEventBatch:
    return KvEventBatch(seq=seq, ts_s=time.time(), events=events, data_parallel_rank=0)


def fed(*batches: KvEventBatch) -> EventPresence:
    presence = EventPresence()
    for item in batches:
        presence.apply(item)
        presence.check_invariants()
    return presence


PROMPT = list(range(100, 112))  # three blocks of 4


# --- the index, pure -------------------------------------------------------------------


def test_stored_blocks_are_held_as_leading_tokens_of_a_prompt() -> None:
    presence = fed(batch(0, stored([b"a", b"b"], None, PROMPT[:8])))
    assert presence.held_tokens(PROMPT) == 8
    assert presence.held_tokens(PROMPT[:7]) == 4  # a partial block never counts
    assert presence.held_tokens([1, *PROMPT]) == 0  # the same blocks elsewhere do not
    assert presence.stats.blocks_held == 2 and presence.stats.stored == 2


def test_a_child_stored_later_extends_the_held_prefix_through_its_parent_hash() -> None:
    presence = fed(
        batch(0, stored([b"a"], None, PROMPT[:4])), batch(1, stored([b"b"], b"a", PROMPT[4:8]))
    )
    assert presence.held_tokens(PROMPT) == 8


def test_a_removed_block_stops_what_hangs_under_it_from_matching() -> None:
    presence = fed(
        batch(0, stored([b"a", b"b", b"c"], None, PROMPT)),
        batch(1, removed([b"b"])),
    )
    assert presence.held_tokens(PROMPT) == 4
    assert len(presence) == 2 and presence.stats.removed == 1
    presence.apply(batch(2, stored([b"b"], b"a", PROMPT[4:8])))  # back with the same hash
    assert presence.held_tokens(PROMPT) == 12


def test_removing_an_unknown_block_is_counted_apart() -> None:
    presence = fed(batch(0, removed([b"zz"])))
    assert presence.stats.unknown_removed == 1 and presence.stats.removed == 0


def test_all_blocks_cleared_empties_it() -> None:
    presence = fed(batch(0, stored([b"a"], None, PROMPT[:4])), batch(1, AllBlocksCleared()))
    assert presence.held_tokens(PROMPT) == 0 and len(presence) == 0
    assert presence.stats.cleared == 1


def test_blocks_of_another_medium_or_lora_do_not_count_as_held() -> None:
    cpu = BlockStored((b"a",), None, tuple(PROMPT[:4]), BLOCK, "CPU", None, None, None)
    lora = BlockStored((b"b",), None, tuple(PROMPT[:4]), BLOCK, "GPU", "sql", None, None)
    presence = fed(batch(0, cpu, lora))
    assert presence.held_tokens(PROMPT) == 0
    assert presence.held_tokens(PROMPT, lora_name="sql") == 4
    assert presence.stats.ignored == 1


def test_the_bound_drops_the_oldest_stored_blocks() -> None:
    presence = EventPresence(max_blocks=2)
    presence.apply(batch(0, stored([b"a", b"b", b"c"], None, PROMPT)))
    presence.check_invariants()
    assert len(presence) == 2 and presence.stats.dropped_over_bound == 1
    assert presence.held_tokens(PROMPT) == 0  # the root went first: nothing leads


# --- the wire ---------------------------------------------------------------------------


def test_a_batch_round_trips_through_the_wire_form() -> None:
    original = batch(7, stored([b"a"], None, PROMPT[:4]), removed([5]), AllBlocksCleared())
    assert decode_batch(7, encode_batch(original)) == original


def test_the_positional_event_form_of_older_vllm_is_read() -> None:
    import msgpack

    payload = msgpack.packb(
        [
            1.5,
            [
                ["BlockStored", [11], None, PROMPT[:4], 4, None, "GPU"],
                ["BlockRemoved", [11], "GPU"],
                ["AllBlocksCleared"],
                {"type": "SomethingNewer"},
            ],
        ],
        use_bin_type=True,
    )
    decoded = decode_batch(3, payload)
    assert [type(e).__name__ for e in decoded.events] == [
        "BlockStored",
        "BlockRemoved",
        "AllBlocksCleared",
    ]
    assert decoded.events[0] == BlockStored(
        (11,), None, tuple(PROMPT[:4]), 4, "GPU", None, None, None
    )
    assert decoded.data_parallel_rank is None


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"\xc1", "payload"),
        (b"\x91\x01", "batch"),
        (b"\x92\xa1x\x90", "batch.ts"),
        (b"\x92\x01\x91\x82\xa4type\xabBlockStored\xa9token_ids\x01", "token_ids"),
    ],
)
def test_a_bad_payload_is_rejected_naming_the_field(payload: bytes, field: str) -> None:
    with pytest.raises(KvEventDecodeError, match=field):
        decode_batch(0, payload)


# --- the stream, scripted ---------------------------------------------------------------


def following(
    port: int,
    replay_port: int | None,
    presence: EventPresence,
    gaps: list[tuple[int, int]],
    **kwargs: float,
) -> KvEventSubscriber:
    def on_gap(first: int, last: int) -> None:
        gaps.append((first, last))
        presence.note_gap(first, last)

    return KvEventSubscriber(
        f"tcp://127.0.0.1:{port}",
        replay_endpoint=None if replay_port is None else f"tcp://127.0.0.1:{replay_port}",
        on_batch=presence.apply,
        on_reset=presence.reset,
        on_gap=on_gap,
        on_replay=presence.note_replay,
        on_disconnect=presence.note_disconnect,
        **kwargs,
    )


THREE = [
    batch(0, stored([b"a"], None, PROMPT[:4])),
    batch(1, stored([b"b"], b"a", PROMPT[4:8])),
    batch(2, stored([b"c"], b"b", PROMPT[8:12])),
]


async def test_a_dropped_batch_is_replayed_and_presence_catches_up() -> None:
    ctx = zmq.asyncio.Context()
    port, replay_port = free_port(), free_port()
    publisher = ScriptedPublisher(ctx, port, replay_port)
    presence, gaps = EventPresence(), []
    subscriber = following(port, replay_port, presence, gaps)
    subscriber.start()
    try:
        await publisher.subscribed()
        await publisher.publish(THREE[0])
        await publisher.publish(THREE[1], drop=True)
        await publisher.publish(THREE[2])
        await until(lambda: subscriber.last_seq == 2)
        assert presence.held_tokens(PROMPT) == 12 and presence.exact
        assert (subscriber.stats.replays, subscriber.stats.replayed_batches) == (1, 2)
        assert subscriber.stats.duplicates == 1 and subscriber.stats.gaps == 0 and gaps == []
        assert presence.stats.replays == 1
        presence.check_invariants()
    finally:
        await subscriber.close()
        await publisher.close()
        ctx.term()


@pytest.mark.parametrize("replay", ["none", "dead"])
async def test_a_gap_without_a_working_replay_is_reported_and_counted(replay: str) -> None:
    ctx = zmq.asyncio.Context()
    port = free_port()
    publisher = ScriptedPublisher(ctx, port, None)
    presence, gaps = EventPresence(), []
    subscriber = following(
        port, free_port() if replay == "dead" else None, presence, gaps, replay_timeout_s=0.3
    )
    subscriber.start()
    try:
        await publisher.subscribed()
        await publisher.publish(THREE[0])
        await publisher.publish(THREE[1], drop=True)
        await publisher.publish(THREE[2])
        await until(lambda: subscriber.last_seq == 2)
        assert gaps == [(1, 1)]
        assert (subscriber.stats.gaps, subscriber.stats.missed_batches) == (1, 1)
        assert subscriber.stats.replay_failures == (1 if replay == "dead" else 0)
        assert presence.stats.gaps == 1 and not presence.exact
        assert presence.held_tokens(PROMPT) == 4  # b was never seen, so c hangs from nothing
    finally:
        await subscriber.close()
        await publisher.close()
        ctx.term()


async def test_a_publisher_starting_over_clears_that_upstreams_presence() -> None:
    ctx = zmq.asyncio.Context()
    port = free_port()
    publisher = ScriptedPublisher(ctx, port, None)
    presence, gaps = EventPresence(), []
    subscriber = following(port, None, presence, gaps)
    subscriber.start()
    try:
        await publisher.subscribed()
        for item in THREE:
            await publisher.publish(item)
        await until(lambda: subscriber.last_seq == 2)
        assert presence.held_tokens(PROMPT) == 12
        await publisher.close()
        publisher = ScriptedPublisher(ctx, port, None)  # the restarted engine, same port
        await publisher.subscribed()
        other = [7, 7, 7, 7]
        await publisher.publish(batch(0, stored([b"x"], None, other)))
        await until(lambda: subscriber.stats.resets == 1 and subscriber.last_seq == 0)
        assert presence.held_tokens(PROMPT) == 0 and presence.held_tokens(other) == 4
        assert presence.stats.resets == 1 and presence.exact and gaps == []
        presence.check_invariants()
    finally:
        await subscriber.close()
        await publisher.close()
        ctx.term()


async def test_an_undecodable_batch_is_counted_and_its_loss_is_a_gap() -> None:
    ctx = zmq.asyncio.Context()
    port = free_port()
    publisher = ScriptedPublisher(ctx, port, None)
    presence, gaps = EventPresence(), []
    subscriber = following(port, None, presence, gaps)
    subscriber.start()
    try:
        await publisher.subscribed()
        await publisher.pub.send_multipart([b"", b"short"])
        await publisher.publish(THREE[0])
        await publisher.pub.send_multipart([b"", encode_seq(1), b"\xc1"])
        await publisher.publish(THREE[2])
        await until(lambda: subscriber.last_seq == 2)
        assert subscriber.stats.decode_errors == 2 and subscriber.stats.resets == 0
        assert gaps == [(1, 1)] and presence.held_tokens(PROMPT) == 4
    finally:
        await subscriber.close()
        await publisher.close()
        ctx.term()


async def test_close_before_any_message_returns_promptly() -> None:
    subscriber = KvEventSubscriber(f"tcp://127.0.0.1:{free_port()}", on_batch=lambda b: None)
    subscriber.start()
    await asyncio.wait_for(subscriber.close(), 2)
    await subscriber.close()
