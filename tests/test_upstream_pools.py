"""Small connection pools behind one client: same limits in all, requests taken in turn."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from kvern.upstream.pools import SHARD_KEEPALIVE, ShardedPools
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
