"""An upstream's KV events as kvern's presence: config, detection, the feed, doubt and restarts.

Why scripted publishers here: these are the states a real engine reaches
only by accident (a restart whose first batches were missed, a dropped
connection that comes back) and must be reached on cue; the scripted
publisher frames and replays as vLLM's does (see tests/test_kv_events.py).
The real-vLLM tests of the same feed are in tests/test_kv_events_vllm.py.
"""

from __future__ import annotations

import time
from typing import Any

import pydantic
import pytest
import zmq
import zmq.asyncio

from kvern.config.routing import UpstreamEntry
from kvern.routing.book import PresenceBook
from kvern.routing.event_presence import EventPresence
from kvern.routing.presence_match import UpstreamCache
from kvern.tracking.kv_feed import KvFeed
from kvern.upstream.kv_events import BlockStored
from kvern.upstream.kv_events.endpoints import configured, connectable, from_server_info
from tests.kv_publisher import ScriptedPublisher, until
from tests.servers import free_port
from tests.test_kv_events import PROMPT, THREE, batch, following, stored

# --- config -----------------------------------------------------------------------------


def entry(**fields: Any) -> UpstreamEntry:
    return UpstreamEntry(name="a", url="http://10.0.0.5:8000/v1", **fields)


def test_a_wildcard_endpoint_is_connected_at_the_upstreams_host() -> None:
    found = configured(entry(kv_events="tcp://*:5557", kv_events_replay="tcp://*:5558"))
    assert found is not None
    assert (found.endpoint, found.replay_endpoint) == ("tcp://10.0.0.5:5557", "tcp://10.0.0.5:5558")
    assert connectable("tcp://0.0.0.0:1", "http://[::1]:8000/v1") == "tcp://[::1]:1"
    assert connectable("tcp://other:1", "http://h:1") == "tcp://other:1"
    assert connectable("ipc:///tmp/kv", "http://h:1") == "ipc:///tmp/kv"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"kv_events": "http://10.0.0.5:5557"}, "kv_events"),
        ({"kv_events": "tcp://h"}, "kv_events"),
        ({"kv_events": "tcp://h:1", "kv_events_replay": "5558"}, "kv_events_replay"),
        ({"kv_events_replay": "tcp://*:5558"}, "kv_events_replay"),
        ({"kv_events": "auto", "kv_events_topic": "kv"}, "kv_events_topic"),
    ],
)
def test_a_bad_kv_events_setting_is_refused_naming_it(fields: dict[str, str], named: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=named):
        entry(**fields)


def test_no_kv_events_means_no_endpoints() -> None:
    assert configured(entry()) is None and configured(entry(kv_events="auto")) is None


def test_detection_reads_vllms_server_info() -> None:
    body = {
        "vllm_config": {
            "kv_events_config": {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": "tcp://*:5557",
                "replay_endpoint": "tcp://*:5558",
                "topic": "kv",
            }
        }
    }
    found = from_server_info(body, "http://10.0.0.5:8000/v1")
    assert found.endpoints is not None and found.final
    assert found.endpoints.endpoint == "tcp://10.0.0.5:5557"
    assert (found.endpoints.replay_endpoint, found.endpoints.topic) == ("tcp://10.0.0.5:5558", "kv")
    off = {"vllm_config": {"kv_events_config": {"enable_kv_cache_events": False}}}
    assert from_server_info(off, "http://h:1").endpoints is None
    assert from_server_info({"vllm_config": "model=..."}, "http://h:1").final


# --- presence in doubt ------------------------------------------------------------------


def test_presence_is_in_doubt_until_the_first_batch() -> None:
    presence = EventPresence()
    assert not presence.exact  # an engine running before kvern came may hold anything
    presence.apply(THREE[0])
    assert presence.exact and presence.held_tokens(PROMPT) == 4


def test_a_lost_connection_puts_presence_in_doubt_until_the_stream_goes_on() -> None:
    presence = EventPresence()
    presence.apply(THREE[0])
    presence.note_disconnect()
    assert not presence.exact and presence.stats.fallbacks == 1
    presence.apply(THREE[1])  # the same engine: nothing was lost
    assert presence.exact and presence.held_tokens(PROMPT) == 8
    presence.check_invariants()


def test_a_loras_blocks_are_held_under_its_name_only() -> None:
    lora = BlockStored(
        block_hashes=(b"l",),
        parent_block_hash=None,
        token_ids=tuple(PROMPT[:4]),
        block_size=4,
        medium="GPU",
        lora_name="sql-lora",
        extra_keys=None,
        group_idx=None,
    )
    presence = EventPresence()
    presence.apply(batch(0, lora))
    assert presence.lora_names == {"sql-lora"}
    assert presence.held_tokens(PROMPT, lora_name="sql-lora") == 4
    assert presence.held_tokens(PROMPT) == 0


# --- the subscriber across a restart ----------------------------------------------------


async def test_a_restart_whose_first_batches_were_missed_is_told_by_the_disconnect() -> None:
    """Numbering alone would take seq 5 after seq 2 for a gap in the same stream."""
    ctx = zmq.asyncio.Context()
    port, replay_port = free_port(), free_port()
    publisher = ScriptedPublisher(ctx, port, replay_port)
    presence, gaps = EventPresence(), []
    subscriber = following(port, replay_port, presence, gaps)
    subscriber.start()
    try:
        await publisher.subscribed()
        for item in THREE:
            await publisher.publish(item)
        await until(lambda: subscriber.last_seq == 2)
        await publisher.close()
        await until(lambda: subscriber.stats.disconnects == 1)
        assert not presence.exact
        publisher = ScriptedPublisher(ctx, port, replay_port)  # restarted, same ports
        await publisher.subscribed()
        fresh = [batch(s, stored([bytes([s])], None, [s] * 4)) for s in range(6)]
        for item in fresh[:5]:
            await publisher.publish(item, drop=True)  # before kvern's SUB was back
        await publisher.publish(fresh[5])
        await until(lambda: subscriber.last_seq == 5)
        assert subscriber.stats.resets == 1 and gaps == []
        assert presence.held_tokens(PROMPT) == 0  # the old engine's blocks are gone
        assert all(presence.held_tokens([s] * 4) == 4 for s in range(6))  # replayed from 0
        assert presence.exact
        presence.check_invariants()
    finally:
        await subscriber.close()
        await publisher.close()
        ctx.term()


# --- the feed ---------------------------------------------------------------------------


def book_for(*names: str) -> PresenceBook:
    caches = [UpstreamCache(name, 1_000_000, 4) for name in names]
    return PresenceBook(caches, learn=False, trusted_before=lambda name: float("inf"))


async def test_the_feed_answers_from_events_and_falls_back_after_a_lost_batch() -> None:
    ctx = zmq.asyncio.Context()
    port = free_port()
    publisher = ScriptedPublisher(ctx, port, None)
    evented = entry(kv_events=f"tcp://*:{port}", block_size=4).model_copy(
        update={"url": "http://127.0.0.1:1/v1"}
    )
    book = book_for("a", "b")
    feed = KvFeed.attach([evented, UpstreamEntry(name="b", url="http://b:1/v1")], book)
    assert set(book.exact_sources) == {"a"}
    feed.start()
    try:
        await publisher.subscribed()
        assert feed.held_tokens("m", "a", PROMPT) is None  # nothing heard yet
        assert feed.caught_up_s("a") == float("-inf")
        before_s = time.time()
        await publisher.publish(THREE[0])
        await publisher.publish(THREE[1])
        await until(lambda: feed.view()["a"]["batches"] == 2)
        assert feed.held_tokens("m", "a", PROMPT) == 8
        assert before_s <= feed.caught_up_s("a") <= time.time()
        assert feed.caught_up_s("b") == float("-inf")  # not followed
        assert feed.held_tokens("m", "a", PROMPT[:8]) == 4  # never a prompt's last token
        await publisher.publish(THREE[2], drop=True)
        await publisher.publish(batch(3))
        await until(lambda: feed.view()["a"]["gaps"] == 1)
        assert feed.held_tokens("m", "a", PROMPT) is None
        view = feed.view()["a"]
        assert (view["exact"], view["fallbacks"], view["missed_batches"]) == (False, 1, 1)
        assert view["answers"] == {"events": 2, "model": 2}
        metrics = {m.name: m for m in feed.families()}
        assert metrics["kvern_kv_events_exact"].samples[0].value == 0
        assert metrics["kvern_kv_events_fallbacks"].samples[0].value == 1
        assert metrics["kvern_kv_events_blocks_held"].samples[0].value == 2
    finally:
        await feed.close()
        await publisher.close()
        ctx.term()


def test_a_late_prediction_does_not_count_blocks_received_after_the_request_arrived() -> None:
    """Routing's question came too late: the engine served the request before kvern predicted."""
    presence = EventPresence()
    presence.apply(THREE[0], received_s=10.0)
    presence.apply(THREE[1], received_s=20.0)  # the request's own prefill, arrived at 15
    assert presence.held_tokens(PROMPT, stored_before_s=15.0) == 4
    assert presence.held_tokens(PROMPT) == 8
