"""``kvern doctor``'s ``upstreams[].kv_events`` lines, and the whole doctor on a config file.

The publisher is a ZeroMQ one in vLLM's wire format on 127.0.0.1
(tests/kv_publisher.py), or, for the whole ``kvern doctor``, an upstream
that publishes a batch per chat it answers, so the batches counted are the
ones the doctor's own requests made. ``auto`` asks small HTTP servers
answering vLLM's ``/server_info``; the faults are ports nobody listens on, or
where something that is not ZeroMQ does. The whole run also reads the
shared-state lines from a real ``redis-server``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
import zmq
import zmq.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvern.__main__ import main
from kvern.config import UpstreamEntry
from kvern.doctor.kv_events_checks import KvEventsWatch
from kvern.doctor.report import Check
from kvern.doctor.upstream_checks import UpstreamFindings
from kvern.upstream.client import Upstream
from kvern.upstream.kv_events import KvEventBatch, encode_batch, encode_seq
from tests.kv_publisher import ScriptedPublisher
from tests.redis_server import redis_server
from tests.servers import blackhole, chat_answer, free_port, serve


def lines(checks: list[Check]) -> list[str]:
    return [c.line() for c in checks]


def empty_batch(seq: int) -> KvEventBatch:
    return KvEventBatch(seq=seq, ts_s=time.time(), events=(), data_parallel_rank=None)


# -- upstreams[].kv_events ---------------------------------------------------------------


def found_for(url: str = "http://127.0.0.1:9/v1", **kv: str) -> UpstreamFindings:
    entry = UpstreamEntry(name="a", url=url, **kv)
    found = UpstreamFindings(entry=entry, upstream=Upstream.at(url, "a"), key="upstreams[0].url")
    found.reachable = True
    found.chats_sent = 2  # the cached-token check's two chats went to it
    return found


@asynccontextmanager
async def watching(found: UpstreamFindings, *, listen: bool = True) -> AsyncIterator[KvEventsWatch]:
    async with httpx.AsyncClient() as client:
        watch = KvEventsWatch(
            client, [found], listen=listen, timeout_s=5, connect_timeout_s=1, settle_s=0.5
        )
        try:
            yield watch
        finally:
            await watch.close()


@asynccontextmanager
async def publisher(replay: bool = True) -> AsyncIterator[tuple[ScriptedPublisher, int, int]]:
    ctx = zmq.asyncio.Context()
    port, replay_port = free_port(), free_port()
    pub = ScriptedPublisher(ctx, port, replay_port if replay else None)
    try:
        yield pub, port, replay_port
    finally:
        await pub.close()
        ctx.term()


async def test_batches_published_during_the_requests_are_counted_with_their_seq_range() -> None:
    async with publisher() as (pub, port, replay_port):
        found = found_for(kv_events=f"tcp://*:{port}", kv_events_replay=f"tcp://*:{replay_port}")
        async with watching(found) as watch:
            assert lines(await watch.start()) == [
                f"✓ upstream a kv events: tcp://127.0.0.1:{port} accepts connections",
                f"✓ upstream a kv replay: tcp://127.0.0.1:{replay_port} accepts connections",
            ]
            await pub.subscribed()  # subscribed before start() returned
            for seq in (41, 42, 43):  # what the engine publishes while the requests run
                await pub.publish(empty_batch(seq))
            events, replay = await watch.finish()
        assert (
            events.line()
            == "✓ upstream a kv events: 3 batches (seq 41-43) during the doctor's requests"
        )
        assert replay.status == "ok", replay.line()
        assert replay.message.startswith(
            f"tcp://127.0.0.1:{replay_port} answered a replay request from seq 41 in "
        )
        assert replay.message.endswith("(3 batch(es) buffered from there)")
        # The subscription ended with the check: the publisher saw it go.
        gone = await asyncio.wait_for(pub.pub.recv(), 5)
        assert gone[:1] == b"\x00"


async def test_nothing_published_during_the_requests_is_a_warning() -> None:
    async with publisher(replay=False) as (pub, port, _):
        async with watching(found_for(kv_events=f"tcp://127.0.0.1:{port}")) as watch:
            assert [c.status for c in await watch.start()] == ["ok"]
            (events,) = await watch.finish()
    assert events.status == "warn"
    assert events.message == (
        f"no events arrived on tcp://127.0.0.1:{port} while the doctor's requests ran"
    )
    assert events.fix is not None and "enable_kv_cache_events" in events.fix


async def test_silence_from_an_upstream_the_doctor_sent_no_request_is_not_blamed_on_it() -> None:
    async with publisher(replay=False) as (pub, port, _):
        found = found_for(kv_events=f"tcp://127.0.0.1:{port}")
        found.chats_sent = 0  # e.g. it lists no model to ask
        async with watching(found) as watch:
            await watch.start()
            (events,) = await watch.finish()
    assert events.status == "warn" and events.message.startswith("not checked end to end")
    assert events.fix == "see upstream a's cached-tokens line for why"


async def test_a_hole_in_the_sequence_is_a_warning_naming_what_is_missing() -> None:
    async with publisher(replay=False) as (pub, port, _):
        async with watching(found_for(kv_events=f"tcp://127.0.0.1:{port}")) as watch:
            await watch.start()
            await pub.subscribed()
            await pub.publish(empty_batch(7))
            await pub.publish(empty_batch(8), drop=True)
            await pub.publish(empty_batch(9))
            (events,) = await watch.finish()
    assert events.status == "warn"
    assert events.message == (
        "2 batches (seq 7-9) during the doctor's requests, 1 missing between them: "
        "the publisher drops batches"
    )


async def test_a_watch_closed_without_finishing_leaves_no_subscription() -> None:
    """As when a check between start and finish raised: diagnose closes it in a finally."""
    async with publisher(replay=False) as (pub, port, _):
        async with watching(found_for(kv_events=f"tcp://127.0.0.1:{port}")) as watch:
            await watch.start()
            await pub.subscribed()
            await watch.close()
            gone = await asyncio.wait_for(pub.pub.recv(), 5)
            assert gone[:1] == b"\x00"  # the SUB went away
            assert await watch.finish() == []  # and nothing is left to report


async def test_a_closed_port_fails_naming_the_endpoint_and_vllms_flag() -> None:
    port, replay_port = free_port(), free_port()
    found = found_for(kv_events=f"tcp://*:{port}", kv_events_replay=f"tcp://*:{replay_port}")
    async with watching(found) as watch:
        pub, replay = await watch.start()
        assert await watch.finish() == []  # nothing to listen to
    assert pub.status == "fail"
    assert pub.message.startswith(f"tcp://127.0.0.1:{port} refused: ")
    assert pub.fix is not None and pub.fix.startswith(
        'start vLLM with --kv-events-config \'{"enable_kv_cache_events": true, '
        f'"publisher": "zmq", "endpoint": "tcp://*:{port}", '
        f'"replay_endpoint": "tcp://*:{replay_port}"}}\''
    )
    assert pub.fix.endswith("or correct upstreams[0].kv_events")
    assert replay.status == "fail" and replay.subject == "upstream a kv replay"
    assert replay.message.startswith(f"tcp://127.0.0.1:{replay_port} refused: ")


async def test_a_port_held_by_something_that_is_not_zeromq_is_a_warning() -> None:
    with blackhole() as url:
        port = url.rsplit(":", 1)[1]
        async with watching(found_for(kv_events=f"tcp://127.0.0.1:{port}")) as watch:
            reach, handshake = await watch.start()
            assert await watch.finish() == []
    assert reach.status == "ok"
    assert handshake.status == "warn" and "no ZeroMQ handshake came within 1 s" in handshake.message


async def test_with_no_requests_only_the_reachability_lines_are_given() -> None:
    async with publisher() as (pub, port, replay_port):
        found = found_for(
            kv_events=f"tcp://127.0.0.1:{port}", kv_events_replay=f"tcp://127.0.0.1:{replay_port}"
        )
        async with watching(found, listen=False) as watch:
            assert [c.status for c in await watch.start()] == ["ok", "ok"]
            assert await watch.finish() == []


def server_info_app(body: dict[str, Any] | None) -> Starlette:
    """An upstream whose ``/server_info`` answers ``body`` (None: no such route, a 404)."""

    async def server_info(request: Request) -> Response:
        assert request.query_params["config_format"] == "json"
        return JSONResponse(body)

    return Starlette(routes=[Route("/server_info", server_info)] if body is not None else [])


async def test_auto_against_a_vllm_without_dev_mode_explains_the_404() -> None:
    with serve(server_info_app(None)) as url:
        async with watching(found_for(url + "/v1", kv_events="auto")) as watch:
            (check,) = await watch.start()
    assert check.status == "warn"
    assert check.message.startswith(f"auto: not found ({url}/server_info answered 404: ")
    assert "VLLM_SERVER_DEV_MODE=1" in check.message
    assert check.fix == "set upstreams[0].kv_events to vLLM's endpoint by hand (tcp://HOST:PORT)"


async def test_auto_finds_the_endpoint_vllm_names_in_its_server_info() -> None:
    async with publisher() as (pub, port, replay_port):
        config = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{port}",
            "replay_endpoint": f"tcp://*:{replay_port}",
            "topic": "",
        }
        with serve(server_info_app({"vllm_config": {"kv_events_config": config}})) as url:
            async with watching(found_for(url + "/v1", kv_events="auto")) as watch:
                events, replay = await watch.start()
                await pub.subscribed()
                await pub.publish(empty_batch(0))
                done = await watch.finish()
    assert events.line() == (
        f"✓ upstream a kv events: auto, from /server_info: tcp://127.0.0.1:{port} "
        "accepts connections"
    )
    assert replay.line() == (
        f"✓ upstream a kv replay: tcp://127.0.0.1:{replay_port} accepts connections"
    )
    assert done[0].line() == (
        "✓ upstream a kv events: 1 batch (seq 0) during the doctor's requests"
    )


# -- the whole kvern doctor --------------------------------------------------------------


@contextmanager
def events_upstream(port: int) -> Iterator[str]:
    """An OpenAI upstream publishing a batch in vLLM's form (PUB on ``port``) per chat answered."""
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")
    seq = [100]

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "m"}]})

    async def chat(request: Request) -> Response:
        answer = await chat_answer(request)
        pub.send_multipart([b"", encode_seq(seq[0]), encode_batch(empty_batch(seq[0]))])
        seq[0] += 1
        return answer

    app = Starlette(
        routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])]
    )
    try:
        with serve(app) as url:
            yield url
    finally:
        pub.close(linger=0)


def doctor(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str]:
    code = main(["doctor", "--config", str(config), *args])
    return code, capsys.readouterr().out


def test_kvern_doctor_reports_the_store_and_the_events_its_requests_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    with redis_server(tmp_path) as store, events_upstream(port) as url:
        data = {
            "upstreams": [{"name": "a", "url": url + "/v1", "kv_events": f"tcp://*:{port}"}],
            "routing": {"shared_state": store.url.replace("redis://", "redis://:pw@")},
            "analytics": {"enabled": False},
            "proxy": {"port": free_port()},
        }
        admin = store.client()
        admin.config_set("requirepass", "pw")
        admin.close()
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        code, out = doctor(capsys, path)
        quiet_code, quiet = doctor(capsys, path, "--no-requests")
    assert code == 0, out
    ours = [line for line in out.splitlines() if "shared state" in line or "kv " in line]
    assert ours[0].startswith(f"✓ shared state: redis://***@127.0.0.1:{store.port}/0: redis ")
    assert ours[1:] == [
        "✓ shared state fleet: no instance publishing load under prefix 'kvern' yet "
        "(none is running, or they use another prefix)",
        f"✓ upstream a kv events: tcp://127.0.0.1:{port} accepts connections",
        "✓ upstream a kv events: 2 batches (seq 100-101) during the doctor's requests",
    ]
    # The events line comes after the cached-token requests it listened to.
    order = out.splitlines()
    assert order.index(ours[-1]) > order.index(
        next(line for line in order if "cached tokens" in line)
    )
    assert ":pw@" not in out
    assert quiet_code == 0, quiet
    assert [line for line in quiet.splitlines() if "kv events" in line] == [
        f"✓ upstream a kv events: tcp://127.0.0.1:{port} accepts connections"
    ]
