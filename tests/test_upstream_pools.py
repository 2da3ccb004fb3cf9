"""Small connection pools behind one client: same limits in all, requests taken in turn;
a request the server dropped on a reused connection, before any byte, sent once more."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from kvern.upstream.pools import SHARD_KEEPALIVE, STALE_RETRIED, ShardedPools
from tests.raw_upstream import CHAT, Reply, Seen, answer, normal, raw_upstream
from tests.servers import serve


def test_the_limits_are_split_over_shards_of_small_pools() -> None:
    pools = ShardedPools(httpx.Limits(max_connections=256, max_keepalive_connections=64))
    assert len(pools.shards) == 64 // SHARD_KEEPALIVE
    for shard in pools.shards:
        assert shard._pool._max_connections == 64
        assert shard._pool._max_keepalive_connections == SHARD_KEEPALIVE
    few = ShardedPools(httpx.Limits(max_connections=4, max_keepalive_connections=2))
    assert len(few.shards) == 1


async def test_requests_go_to_each_pool_in_turn_and_reuse_its_connection() -> None:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hi")

    app = Starlette(routes=[Route("/", hello)])
    with serve(app) as url:
        pools = ShardedPools(httpx.Limits(max_connections=64, max_keepalive_connections=32))
        async with httpx.AsyncClient(transport=pools) as client:
            for _ in range(2 * len(pools.shards)):
                assert (await client.get(url + "/")).text == "hi"
            held = [len(shard._pool.connections) for shard in pools.shards]
    assert held == [1] * len(pools.shards)  # one kept-alive connection each, used twice


def _second_on_a_connection(then: Reply) -> Callable[[Seen], Reply]:
    """Answer a connection's first request; meet the second with ``then``."""
    return lambda seen: then if seen.number == 2 else normal(seen)


async def _two_posts(url: str) -> tuple[httpx.Response, httpx.Response]:
    pools = ShardedPools(httpx.Limits(max_connections=4, max_keepalive_connections=2))
    async with httpx.AsyncClient(transport=pools, timeout=10) as client:
        first = await client.post(url + "/v1/chat/completions", content=b'{"n": 1}')
        second = await client.post(url + "/v1/chat/completions", content=b'{"n": 2}')
    return first, second


@pytest.mark.parametrize("drop", ["close", "reset"])
async def test_a_reused_connection_dropped_before_any_byte_is_sent_again_on_a_fresh_one(
    drop: str,
) -> None:
    then = Reply(b"", close=True) if drop == "close" else Reply(b"", reset=True)
    with raw_upstream(_second_on_a_connection(then)) as up:
        first, second = await _two_posts(up.url)
    assert first.status_code == second.status_code == 200
    assert STALE_RETRIED not in first.extensions and second.extensions[STALE_RETRIED]
    # Dropped as the second request on connection 1, answered on a new connection.
    assert up.places() == [(1, 1), (1, 2), (2, 1)]
    assert [s.body for s in up.seen] == [b'{"n": 1}', b'{"n": 2}', b'{"n": 2}']


async def test_a_fresh_connection_dropped_unanswered_is_not_sent_again() -> None:
    with raw_upstream(lambda seen: Reply(b"", close=True)) as up:
        with pytest.raises(httpx.RemoteProtocolError):
            await _two_posts(up.url)
    assert up.places() == [(1, 1)]


@pytest.mark.parametrize(
    "partial",
    [b"HTTP/1.1 200 OK\r\ncontent-", answer(CHAT)[:-5]],
    ids=["half a status block", "headers and half the body"],
)
async def test_a_reused_connection_whose_answer_began_is_not_sent_again(partial: bytes) -> None:
    with raw_upstream(_second_on_a_connection(Reply(partial, close=True))) as up:
        with pytest.raises(httpx.RemoteProtocolError):
            await _two_posts(up.url)
    assert up.places() == [(1, 1), (1, 2)]
