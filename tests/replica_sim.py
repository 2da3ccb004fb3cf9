"""A simulated vLLM-like replica behind an OpenAI-compatible chat endpoint.

Routing benchmarks and tests run several of these on 127.0.0.1 behind a router.
What matters for routing is simulated, cheaply but honestly:

- a real prefix cache of full blocks, hashed as a chain
  (``hash(parent_hash, block_tokens)``), LRU over a fixed number of blocks, with
  blocks of running requests pinned; a prompt reuses the longest run of leading
  blocks present, and its last token is always computed (as vLLM does);
- at most ``max_concurrency`` running requests, the rest wait in FIFO order;
- time: prefill sleeps ``uncached_tokens * prefill_s_per_token``, then each of
  ``max_tokens`` decode steps sleeps ``decode_s_per_token``;
- usage reports ``prompt_tokens_details.cached_tokens`` from that cache.

Eviction order follows vLLM's free-block queue: a finished request releases
its blocks leaf first, so the root of a prefix is the most recently used and
tails are evicted before the prefixes they hang from::

    release of [b0 -> b1 -> b2]      free queue: ... b2, b1, b0   (evict from the left)

Fault injection for failover tests: ``state.fail_mode = "refuse"`` answers 503,
``"hang"`` holds the request until the client leaves or the mode is cleared.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NewType

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

BlockHash = NewType("BlockHash", int)
FailMode = Literal["refuse", "hang"]

DEFAULT_MAX_TOKENS = 16
HANG_POLL_S = 0.05


def word_id(word: str) -> int:
    """A stable token id for a word (``hash(str)`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little")


def word_hash_tokenize(body: dict[str, Any]) -> list[int]:
    """Cheap deterministic stand-in for a chat template plus tokenizer.

    Renders each message as ``role: content`` and gives every whitespace-separated
    word its hashed id, ending with ``assistant:`` like a generation prompt.
    """
    words: list[str] = []
    for message in body.get("messages", []):
        content = message.get("content") or ""
        if not isinstance(content, str):  # OpenAI content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        words.append(f"{message.get('role', 'user')}:")
        words.extend(content.split())
    words.append("assistant:")
    return [word_id(w) for w in words]


class PrefixCache:
    """Chained full-block hashes with an LRU free queue; pure and synchronous.

    Every cached block has a reference count (running requests using it); only
    unreferenced blocks sit in the free queue and can be evicted.
    """

    def __init__(self, *, block_size: int, capacity_blocks: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if capacity_blocks < 0:
            raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self.num_evicted_blocks = 0
        # When a list: what changed, as vLLM's KV events would say it, for the
        # replica to publish: ("stored", hash, parent, block's ids) / ("removed", hash).
        self.events: list[tuple[Any, ...]] | None = None
        self._refs: dict[BlockHash, int] = {}  # every cached block -> running users
        self._free: OrderedDict[BlockHash, None] = OrderedDict()  # refs == 0, LRU first

    def __len__(self) -> int:
        return len(self._refs)

    def __contains__(self, block: object) -> bool:
        return block in self._refs

    def block_hashes(self, token_ids: list[int]) -> list[BlockHash]:
        """Chained hashes of the full blocks of ``token_ids``."""
        hashes: list[BlockHash] = []
        parent = 0
        bs = self.block_size
        for start in range(0, len(token_ids) - bs + 1, bs):
            parent = hash((parent, tuple(token_ids[start : start + bs])))
            hashes.append(BlockHash(parent))
        return hashes

    def match(self, hashes: list[BlockHash], num_tokens: int) -> int:
        """Leading blocks present, leaving at least the last prompt token to compute."""
        usable = min(len(hashes), (num_tokens - 1) // self.block_size) if num_tokens else 0
        n = 0
        while n < usable and hashes[n] in self._refs:
            n += 1
        return n

    def pin(self, hashes: Iterable[BlockHash]) -> None:
        """Take a reference on cached blocks so they cannot be evicted."""
        for h in hashes:
            self._refs[h] += 1
            self._free.pop(h, None)

    def insert(
        self,
        hashes: list[BlockHash],
        token_ids: list[int] | None = None,
        parent: BlockHash | None = None,
    ) -> list[BlockHash]:
        """Cache and pin ``hashes`` in chain order; returns those pinned.

        Stops at the first block that does not fit (everything free is evicted
        and the cache is still full): later blocks would be unreachable anyway.
        ``token_ids`` (the blocks' ids, from the first of ``hashes``) and
        ``parent`` (the hash before it) are only needed for :attr:`events`.
        """
        pinned: list[BlockHash] = []
        bs = self.block_size
        for i, h in enumerate(hashes):
            if h not in self._refs:
                if len(self._refs) >= self.capacity_blocks:
                    if not self._free:
                        break
                    victim, _ = self._free.popitem(last=False)
                    del self._refs[victim]
                    self.num_evicted_blocks += 1
                    if self.events is not None:
                        self.events.append(("removed", victim))
                self._refs[h] = 0
                if self.events is not None and token_ids is not None:
                    self.events.append(("stored", h, parent, token_ids[i * bs : (i + 1) * bs]))
            parent = h
            self.pin([h])
            pinned.append(h)
        return pinned

    def unpin(self, hashes: list[BlockHash]) -> None:
        """Release blocks leaf first, so a prefix root is evicted last."""
        for h in reversed(hashes):
            self._refs[h] -= 1
            if self._refs[h] == 0:
                self._free[h] = None

    def check_invariants(self) -> None:
        assert len(self._refs) <= self.capacity_blocks, (len(self._refs), self.capacity_blocks)
        assert all(n >= 0 for n in self._refs.values())
        free = {h for h, n in self._refs.items() if n == 0}
        assert free == set(self._free), "free queue must hold exactly the unreferenced blocks"


@dataclass(slots=True)
class ReplicaState:
    """Counters for assertions and ``GET /metrics-json``; ``fail_mode`` is settable."""

    name: str
    cache: PrefixCache = field(repr=False)
    fail_mode: FailMode | None = None
    requests: int = 0  # chat requests accepted (not refused)
    refused: int = 0  # answered 503 by fail_mode="refuse"
    hanging: int = 0  # requests held by fail_mode="hang" now
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prefill_tokens_computed: int = 0  # prompt_tokens - cached_tokens
    completion_tokens: int = 0
    waiting: int = 0  # requests queued for a running slot now
    in_flight: int = 0  # requests holding a running slot now
    max_in_flight: int = 0
    queue_wait_s: float = 0.0  # total time requests spent waiting for a slot

    @property
    def evicted_blocks(self) -> int:
        return self.cache.num_evicted_blocks

    def metrics(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cache"}
        out["evicted_blocks"] = self.evicted_blocks
        out["cached_blocks"] = len(self.cache)
        return out


@dataclass(slots=True)
class _Run:
    """One request's progress through the simulated engine."""

    prompt_ids: list[int]
    max_tokens: int
    num_cached_tokens: int = 0
    output: list[str] = field(default_factory=list)


def kv_events_publisher(cache: PrefixCache, port: int) -> Callable[[], None]:
    """Publish the cache's changes as vLLM does (ZeroMQ PUB on ``port``, no replay).

    Each call sends what changed since the last as one batch: topic, 8-byte
    sequence, msgpack ``[ts, events]`` (kvern's own encoder of vLLM's form).
    """
    import zmq

    from kvern.upstream.kv_events.wire import (
        BlockRemoved,
        BlockStored,
        KvEventBatch,
        encode_batch,
        encode_seq,
    )

    socket = zmq.Context.instance().socket(zmq.PUB)
    socket.bind(f"tcp://127.0.0.1:{port}")
    cache.events = []
    seq = 0

    def publish() -> None:
        nonlocal seq
        assert cache.events is not None
        if not cache.events:
            return
        events: list[Any] = []
        for item in cache.events:
            if item[0] == "stored":
                _, h, parent, ids = item
                events.append(
                    BlockStored((h,), parent, tuple(ids), cache.block_size, "GPU", None, None, None)
                )
            else:
                events.append(BlockRemoved((item[1],), "GPU", None))
        cache.events.clear()
        payload = encode_batch(KvEventBatch(seq, time.time(), tuple(events), None))
        socket.send_multipart([b"", encode_seq(seq), payload], flags=zmq.NOBLOCK)
        seq += 1

    return publish


def create_replica(
    name: str,
    *,
    block_size: int = 16,
    capacity_blocks: int,
    max_concurrency: int,
    prefill_s_per_token: float,
    decode_s_per_token: float,
    tokenize: Callable[[dict[str, Any]], list[int]] = word_hash_tokenize,
    model: str = "sim",
    cache_generated: bool = False,
    clock: Callable[[], float] = time.monotonic,
    kv_events_port: int = 0,
) -> tuple[Starlette, ReplicaState]:
    """Build one replica app and its state.

    ``tokenize`` turns a chat request body into prompt token ids (a real HF
    ``apply_chat_template``, or the cheap default). With ``cache_generated`` the
    full blocks of prompt + output are cached too, as vLLM keeps them.
    """
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    cache = PrefixCache(block_size=block_size, capacity_blocks=capacity_blocks)
    publish = kv_events_publisher(cache, kv_events_port) if kv_events_port else None
    state = ReplicaState(name=name, cache=cache)
    slots = asyncio.Semaphore(max_concurrency)  # FIFO for waiters

    async def generate(run: _Run) -> AsyncGenerator[str, None]:
        """Queue, prefill, then yield one word per decode step; releases all on exit."""
        ids = run.prompt_ids
        queued_at = clock()
        state.waiting += 1
        try:
            await slots.acquire()
        finally:
            state.waiting -= 1
        pinned: list[BlockHash] = []
        try:
            state.queue_wait_s += clock() - queued_at
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            hashes = cache.block_hashes(ids)
            num_hit = cache.match(hashes, len(ids))
            cache.pin(hashes[:num_hit])
            pinned = hashes[:num_hit]
            run.num_cached_tokens = num_hit * block_size
            uncached = len(ids) - run.num_cached_tokens
            state.prompt_tokens += len(ids)
            state.cached_tokens += run.num_cached_tokens
            state.prefill_tokens_computed += uncached
            await asyncio.sleep(uncached * prefill_s_per_token)
            parent = hashes[num_hit - 1] if num_hit else None
            pinned += cache.insert(hashes[num_hit:], ids[num_hit * block_size :], parent)
            if publish is not None:
                publish()
            for i in range(run.max_tokens):
                await asyncio.sleep(decode_s_per_token)
                run.output.append(f"w{i} ")
                state.completion_tokens += 1
                yield run.output[-1]
            if cache_generated and len(pinned) == len(hashes):
                out_ids = [word_id(w.strip()) for w in run.output]
                pinned += cache.insert(cache.block_hashes(ids + out_ids)[len(hashes) :])
        finally:
            cache.unpin(pinned)
            state.in_flight -= 1
            slots.release()

    async def chat(request: Request) -> Response:
        body = json.loads(await request.body())
        if state.fail_mode == "refuse":
            state.refused += 1
            return JSONResponse(
                {"error": {"message": f"{name} refused", "type": "server_error", "code": 503}},
                status_code=503,
            )
        state.hanging += 1
        try:
            while state.fail_mode == "hang":
                if await request.is_disconnected():
                    return Response(status_code=499)
                await asyncio.sleep(HANG_POLL_S)
        finally:
            state.hanging -= 1
        state.requests += 1
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        run = _Run(prompt_ids=tokenize(body), max_tokens=int(max_tokens or DEFAULT_MAX_TOKENS))
        rid = f"chatcmpl-{name}-{state.requests}"
        created = int(time.time())
        headers = {"x-replica": name}

        def usage() -> dict[str, Any]:
            n_prompt, n_out = len(run.prompt_ids), len(run.output)
            return {
                "prompt_tokens": n_prompt,
                "completion_tokens": n_out,
                "total_tokens": n_prompt + n_out,
                "prompt_tokens_details": {"cached_tokens": run.num_cached_tokens},
            }

        if not body.get("stream"):
            async for _ in generate(run):
                pass
            message = {"role": "assistant", "content": "".join(run.output)}
            choice = {"index": 0, "message": message, "finish_reason": "length", "logprobs": None}
            return JSONResponse(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": body.get("model", model),
                    "choices": [choice],
                    "usage": usage(),
                },
                headers=headers,
            )

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            payload = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.get("model", model),
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(payload)}\n\n".encode()

        def delta(d: dict[str, Any], finish: str | None = None) -> bytes:
            return event([{"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}])

        async def stream() -> AsyncIterator[bytes]:
            tokens = generate(run)
            try:
                first = True
                async for word in tokens:
                    if first:  # vLLM sends the role once the first output exists
                        yield delta({"role": "assistant", "content": ""})
                        first = False
                    yield delta({"content": word})
                yield delta({}, "length")
                if include_usage:
                    yield event([], usage=usage())
                yield b"data: [DONE]\n\n"
            finally:
                await tokens.aclose()

        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def models(request: Request) -> Response:
        card = {"id": model, "object": "model", "created": 0, "owned_by": name}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def metrics_json(request: Request) -> Response:
        return JSONResponse(state.metrics())

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics-json", metrics_json, methods=["GET"]),
        ]
    )
    return app, state
