"""The simulated replica: prefix cache, LRU, concurrency, timing, wire shape, faults."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette

from tests.replica_sim import (
    PrefixCache,
    ReplicaState,
    create_replica,
    word_hash_tokenize,
    word_id,
)
from tests.servers import serve


def int_tokenize(body: dict[str, Any]) -> list[int]:
    """Test tokenizer: the last message's content is its token ids, space separated."""
    return [int(w) for w in body["messages"][-1]["content"].split()]


def make_replica(**overrides: Any) -> tuple[Starlette, ReplicaState]:
    kwargs: dict[str, Any] = {
        "capacity_blocks": 64,
        "max_concurrency": 4,
        "prefill_s_per_token": 0.0,
        "decode_s_per_token": 0.0,
        "tokenize": int_tokenize,
    }
    kwargs.update(overrides)
    return create_replica("r0", **kwargs)


def body(ids: list[int], **extra: Any) -> dict[str, Any]:
    content = " ".join(map(str, ids))
    return {"model": "sim", "messages": [{"role": "user", "content": content}], **extra}


@asynccontextmanager
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as c:
        yield c


async def cached_tokens(c: httpx.AsyncClient, ids: list[int], **extra: Any) -> int:
    r = await c.post("/v1/chat/completions", json=body(ids, max_tokens=2, **extra))
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == len(ids)
    return int(usage["prompt_tokens_details"]["cached_tokens"])


async def test_shared_40_token_prefix_caches_two_full_blocks() -> None:
    app, state = make_replica()
    prefix = list(range(40))
    async with client(app) as c:
        assert await cached_tokens(c, prefix + [1000, 1001]) == 0
        assert await cached_tokens(c, prefix + [2000, 2001, 2002]) == 32
    assert state.requests == 2
    assert state.prompt_tokens == 42 + 43
    assert state.cached_tokens == 32
    assert state.prefill_tokens_computed == 42 + 43 - 32
    state.cache.check_invariants()


@pytest.mark.parametrize("n", [1, 15, 16, 17, 32, 33, 50])
async def test_whole_prompt_repeat_leaves_last_token_to_compute(n: int) -> None:
    app, _ = make_replica()
    ids = list(range(100, 100 + n))
    async with client(app) as c:
        assert await cached_tokens(c, ids) == 0
        assert await cached_tokens(c, ids) == (n - 1) // 16 * 16


async def test_lru_eviction_misses_old_prefix_and_hits_recent() -> None:
    app, state = make_replica(capacity_blocks=4)
    a, b, c_ = (list(range(k * 1000, k * 1000 + 33)) for k in (1, 2, 3))
    async with client(app) as c:
        await cached_tokens(c, a)  # 2 blocks
        await cached_tokens(c, b)  # 2 blocks: full
        await cached_tokens(c, c_)  # evicts both blocks of a
        assert state.evicted_blocks == 2
        assert await cached_tokens(c, b) == 32
        assert await cached_tokens(c, a) == 0
    state.cache.check_invariants()


def test_eviction_takes_tails_before_their_prefix() -> None:
    cache = PrefixCache(block_size=2, capacity_blocks=3)
    a = cache.block_hashes([1, 2, 3, 4])
    b = cache.block_hashes([5, 6])
    cache.unpin(cache.insert(a))
    cache.unpin(cache.insert(b))
    cache.check_invariants()
    cache.unpin(cache.insert(cache.block_hashes([7, 8])))  # evicts a's tail only
    assert cache.num_evicted_blocks == 1
    assert cache.match(a, 5) == 1
    assert b[0] in cache
    cache.check_invariants()


def test_pinned_blocks_are_never_evicted() -> None:
    cache = PrefixCache(block_size=2, capacity_blocks=2)
    running = cache.insert(cache.block_hashes([1, 2, 3, 4]))
    assert cache.insert(cache.block_hashes([5, 6])) == []  # no room, nothing evictable
    assert cache.match(running, 5) == 2
    cache.check_invariants()
    cache.unpin(running)
    cache.unpin(cache.insert(cache.block_hashes([5, 6])))
    assert cache.num_evicted_blocks == 1
    cache.check_invariants()


async def test_concurrency_limit_queues_excess_requests() -> None:
    app, state = make_replica(max_concurrency=2, decode_s_per_token=0.01)
    async with client(app) as c:
        replies = await asyncio.gather(
            *(c.post("/v1/chat/completions", json=body([k] * 20, max_tokens=5)) for k in range(5))
        )
        assert all(r.status_code == 200 for r in replies)
        metrics = (await c.get("/metrics-json")).json()
    assert state.max_in_flight == 2
    assert state.queue_wait_s > 0
    assert state.in_flight == 0 and state.waiting == 0
    assert metrics["max_in_flight"] == 2 and metrics["requests"] == 5
    assert metrics["completion_tokens"] == 25


async def test_prefill_time_grows_with_uncached_tokens() -> None:
    app, _ = make_replica(prefill_s_per_token=0.001)
    async with client(app) as c:
        elapsed = []
        for ids in (list(range(17)), list(range(1000, 1200))):  # 17 vs 200 uncached
            start = time.perf_counter()
            await cached_tokens(c, ids)
            elapsed.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert await cached_tokens(c, list(range(1000, 1200))) == 192  # 8 uncached
        elapsed.append(time.perf_counter() - start)
    assert elapsed[0] < elapsed[1]
    assert elapsed[2] < elapsed[1]


async def test_cache_generated_extends_the_chain_with_output_blocks() -> None:
    app, state = make_replica(cache_generated=True, block_size=4)
    prompt = [1, 2, 3, 4, 5]
    async with client(app) as c:
        r = await c.post("/v1/chat/completions", json=body(prompt, max_tokens=8))
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert len(state.cache) == 3  # 13 tokens of prompt + output: 3 full blocks
        output = [word_id(f"w{i}") for i in range(8)]
        assert await cached_tokens(c, prompt + output + [99]) == 12
    state.cache.check_invariants()


def test_streaming_shape_parses_with_openai_client() -> None:
    app, state = make_replica(tokenize=word_hash_tokenize)
    messages: Any = [{"role": "user", "content": "hello there " * 20}]
    with serve(app) as url:
        oa = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for expected_cached in (0, 32):
            chunks = list(
                oa.chat.completions.create(
                    model="sim",
                    messages=messages,
                    max_tokens=3,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            assert text == "w0 w1 w2 "
            assert chunks[-2].choices[0].finish_reason == "length"
            usage = chunks[-1].usage
            assert usage is not None and not chunks[-1].choices
            assert usage.prompt_tokens == 42  # "user:" + 40 words + "assistant:"
            assert usage.completion_tokens == 3
            assert usage.prompt_tokens_details is not None
            assert usage.prompt_tokens_details.cached_tokens == expected_cached
        reply = oa.chat.completions.create(model="sim", messages=messages, max_tokens=2)
        assert reply.choices[0].message.content == "w0 w1 "
        assert [m.id for m in oa.models.list()] == ["sim"]
        assert httpx.get(url + "/health").status_code == 200
    assert state.in_flight == 0


def test_fail_modes_refuse_then_hang_then_recover() -> None:
    app, state = make_replica()
    with serve(app) as url:
        state.fail_mode = "refuse"
        r = httpx.post(url + "/v1/chat/completions", json=body([1, 2, 3]))
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "server_error"
        state.fail_mode = "hang"
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=body([1, 2, 3]), timeout=0.3)
        deadline = time.monotonic() + 5
        while state.hanging and time.monotonic() < deadline:  # it notices the client left
            time.sleep(0.01)
        assert state.hanging == 0
        state.fail_mode = None
        r = httpx.post(url + "/v1/chat/completions", json=body([1, 2, 3]))
        assert r.status_code == 200 and r.headers["x-replica"] == "r0"
        metrics = httpx.get(url + "/metrics-json").json()
    assert metrics["refused"] == 1 and metrics["requests"] == 1
    assert metrics["fail_mode"] is None


def test_word_hash_tokenizer_is_deterministic_and_prefix_stable() -> None:
    short = {"messages": [{"role": "user", "content": "a b c"}]}
    long = {"messages": [*short["messages"], {"role": "assistant", "content": "d"}]}
    assert word_hash_tokenize(short) == word_hash_tokenize(dict(short))
    assert word_hash_tokenize(long)[:4] == word_hash_tokenize(short)[:4]
    assert len(word_hash_tokenize(short)) == 5


def test_the_replicas_kv_events_tell_exactly_what_its_cache_holds() -> None:
    """What bench/routing.py's events row relies on: vLLM's wire form, block for block."""
    import zmq

    from kvern.routing.event_presence import EventPresence
    from kvern.upstream.kv_events.wire import decode_frames
    from tests.replica_sim import PrefixCache, kv_events_publisher
    from tests.servers import free_port

    cache = PrefixCache(block_size=4, capacity_blocks=5)
    port = free_port()
    publish = kv_events_publisher(cache, port)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    time.sleep(0.3)  # a SUB misses what is published before it is connected
    presence = EventPresence()
    a, b = list(range(17)), [99, *range(1, 17)]
    try:
        for ids in (a, b):  # b shares no block with a; 4 + 4 blocks > 5: a's tail goes
            hashes = cache.block_hashes(ids)
            cache.unpin(cache.insert(hashes, ids))
            publish()
            assert sub.poll(2000), "no batch published"
            presence.apply(decode_frames(sub.recv_multipart()))
        for ids in (a, b):
            assert presence.held_tokens(ids) == cache.match(cache.block_hashes(ids), 10**6) * 4
        assert presence.held_tokens(b) == 16 and presence.held_tokens(a) == 4
    finally:
        sub.close(linger=0)
