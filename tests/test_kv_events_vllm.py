"""Event-fed presence through kvern, against two real vLLM processes (the CPU build).

openai client -> kvern (``upstreams[].kv_events``) -> two vLLM replicas that
publish their KV cache events (ZeroMQ PUB + replay ROUTER, topic "kv"). What
is checked is what a user would see: kvern's predicted cached tokens beside
vLLM's own ``usage.prompt_tokens_details.cached_tokens`` in the analytics
rows, and the ``routing.kv_events`` counters of ``/health`` and ``/metrics``.

Two replicas share the module (start-up about 40-70 s each on 2 cores, about
4 GiB each); each test empties their prefix caches first. The kill and
restart test comes last: it replaces replica "a" with a new process on the
same ports. Sequential requests, so that what vLLM reuses owes nothing to a
request running beside it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import zmq

from kvern.app import create_app
from kvern.config import parse_config
from kvern.routing.event_presence import EventPresence
from kvern.upstream.kv_events import BlockStored, KvEventBatch, KvEventSubscriber
from tests.kv_publisher import until
from tests.servers import free_port, serve
from tests.truth import chat, client_for, flush, rows
from tests.vllm_server import (
    SERVED_MODEL,
    VllmUnavailable,
    install_vllm,
    kv_events_args,
    reset_prefix_cache,
    tiny_model_dir,
    vllm_process,
)

pytestmark = pytest.mark.slow

BLOCK = 32
TOPIC = "kv"


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc: its children, theirs, ...)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@dataclass
class Replica:
    """One vLLM with KV events, on ports it keeps across a restart."""

    name: str
    log_dir: Path
    http_port: int = field(default_factory=free_port)
    events_port: int = field(default_factory=free_port)
    replay_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _server: AbstractContextManager[tuple[subprocess.Popen[bytes], str]] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        self.starts += 1
        extra = kv_events_args(self.events_port, replay_port=self.replay_port, topic=TOPIC)
        self._server = vllm_process(
            block_size=BLOCK,
            extra=extra,
            port=self.http_port,
            log_path=self.log_dir / f"vllm-{self.name}-{self.starts}.log",
        )
        self.proc, _ = self._server.__enter__()

    def kill(self) -> None:
        """SIGKILL the replica whole: its API server and the engine core it spawned.

        The engine core (where the KV events publisher lives) is a child
        process; left alone, it outlives its parent for a while and keeps the
        ports, as no crashed machine would.
        """
        assert self.proc is not None
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self.stop()

    def stop(self) -> None:
        if self._server is not None:
            self._server.__exit__(None, None, None)
            self._server = None

    def rss_gib(self) -> float:
        """Resident memory of the replica's processes together."""
        assert self.proc is not None
        total_kib = 0
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total_kib += int(line.split()[1])
        return total_kib / 1024**2

    def upstream(self, *, events: bool = True, **fields: Any) -> dict[str, Any]:
        """Its ``upstreams[]`` entry; ``*`` as vLLM binds it, kvern connects to 127.0.0.1."""
        entry: dict[str, Any] = {"name": self.name, "url": self.url + "/v1", "block_size": BLOCK}
        if events:
            entry |= {
                "kv_events": f"tcp://*:{self.events_port}",
                "kv_events_replay": f"tcp://*:{self.replay_port}",
                "kv_events_topic": TOPIC,
            }
        return entry | fields


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Replica]]:
    try:
        install_vllm()
        tiny_model_dir()
    except VllmUnavailable as exc:
        pytest.skip(f"no real vLLM here: {exc}")
    logs = tmp_path_factory.mktemp("vllm-logs")
    fleet = {name: Replica(name, logs) for name in ("a", "b")}
    with ExitStack() as stack:
        for replica in fleet.values():
            stack.callback(replica.stop)
        with ThreadPoolExecutor(2) as pool:  # both start at once: about 40 s saved
            for started in [pool.submit(r.start) for r in fleet.values()]:
                started.result()
        print("vLLM RSS GiB:", {n: round(r.rss_gib(), 2) for n, r in fleet.items()})
        yield fleet


@pytest.fixture
def fleet(replicas: dict[str, Replica]) -> dict[str, Replica]:
    for replica in replicas.values():
        reset_prefix_cache(replica.url)
    return replicas


def kvern_config(tmp_path: Path, upstreams: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "upstream": {"read_timeout_s": 60.0, "connect_timeout_s": 2.0},
        "upstreams": upstreams,
        "routing": {"policy": "cache_aware", "health": {"interval_s": 0.5}},
        "tokenizers": {"models": {SERVED_MODEL: str(tiny_model_dir())}},
        "trie": {"block_size": BLOCK, "min_prefix_tokens": 1},
        "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 10},
    }


def system_prompt(tenant: int) -> str:
    return f"Tenant {tenant} policy. " + " ".join(
        f"Clause {tenant}.{i}: answer plainly and cite clause {i}." for i in range(25 + tenant)
    )


def kv_events(kvern: str) -> dict[str, dict[str, Any]]:
    view: dict[str, dict[str, Any]] = httpx.get(kvern + "/health", timeout=30).json()["routing"][
        "kv_events"
    ]
    return view


def wait_until_following(kvern: str, names: set[str]) -> None:
    """The brain subscribed (its view lists them); a moment more for ZeroMQ to connect."""
    deadline = time.monotonic() + 60
    while True:
        view = kv_events(kvern) or {}
        if {n for n, v in view.items() if v["state"] == "following"} >= names:
            break
        assert time.monotonic() < deadline, view
        time.sleep(0.1)
    time.sleep(0.5)


def wait_for_feed(kvern: str, name: str, counter: str, above: int) -> None:
    """Until ``name``'s feed counts ``counter`` past ``above``: events trail the answers.

    vLLM publishes a step's batch beside the answer it ends, so a client can
    have its answer before kvern has the batch; a test that needs a batch seen
    (a hole noticed, a replay landed) before its next request waits for it.
    """
    deadline = time.monotonic() + 30
    while (view := kv_events(kvern)[name])[counter] <= above:
        assert time.monotonic() < deadline, view
        time.sleep(0.05)


def turn(client: openai.OpenAI, history: list[dict[str, str]], n: int) -> None:
    """One greedy turn; its own answer goes into the history (vLLM keeps those blocks too)."""
    answer = chat(client, SERVED_MODEL, history, max_tokens=12)
    history += [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": f"Turn {n}: and then?"},
    ]


def chats(tenants: int, *, first: int = 0) -> list[list[dict[str, str]]]:
    return [
        [{"role": "system", "content": system_prompt(t)}, {"role": "user", "content": "Hi"}]
        for t in range(first, first + tenants)
    ]


def test_event_fed_predictions_equal_vllms_cached_tokens_request_by_request(
    tmp_path: Path, fleet: dict[str, Replica]
) -> None:
    config = kvern_config(tmp_path, [r.upstream() for r in fleet.values()])
    with serve(create_app(parse_config(config))) as kvern:
        wait_until_following(kvern, {"a", "b"})
        client = client_for(kvern)
        histories = chats(4)
        for n in range(3):
            for history in histories:
                turn(client, history, n)
        flush(kvern)
        view = kv_events(kvern)
        metrics = httpx.get(kvern + "/metrics", timeout=30).text
    table = rows(tmp_path / "kvern.db")
    predicted = [r["predicted_cached_tokens"] for r in table]
    reported = [r["reported_cached_tokens"] for r in table]
    shown = {n: (v["answers"], v["blocks_held"], v["batches"]) for n, v in view.items()}
    print("kv_events:", shown)
    print("predicted:", predicted, "reported:", reported)
    assert len(table) == 12 and predicted == reported, (predicted, reported)
    assert sum(reported) >= 8 * BLOCK  # later turns reuse their history
    served = {r["upstream"] for r in table}
    assert served == {"a", "b"}, served  # four tenants spread over both
    # Every prediction after a replica's first batch came from its events (the first
    # request's too when its prediction ran after that batch came, read as of its arrival).
    first = {name: min(i for i, r in enumerate(table) if r["upstream"] == name) for name in served}
    for i, row in enumerate(table):
        assert row["backend_model"] == "events" or i == first[row["upstream"]], i
    for name in ("a", "b"):
        counters = view[name]
        assert counters["exact"] and counters["gaps"] == 0 and counters["fallbacks"] == 0
        assert counters["blocks_held"] > 0 and counters["events_applied"] > 0
        # Asked for routing answers (about both upstreams) and predictions: from events but
        # for the first requests, before that replica's first batch.
        assert counters["answers"]["events"] >= len(table), counters
        assert counters["answers"]["model"] <= 6, counters
        assert f'kvern_kv_events_exact{{upstream="{name}"}} 1.0' in metrics


class EventForwarder:
    """A ZeroMQ SUB -> PUB relay between vLLM and kvern: drops one batch on cue, or delays all.

    ``delay_s``: every batch reaches kvern that much after vLLM published it,
    as when a loaded engine's publisher or the network lags its answers.
    """

    def __init__(self, source: str, delay_s: float = 0.0) -> None:
        self.port = free_port()
        self.delay_s = delay_s
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
        self._sub.connect(source)
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.bind(f"tcp://127.0.0.1:{self.port}")
        self.drop_next = threading.Event()
        self.dropped: list[int] = []
        self._held: deque[tuple[float, list[bytes]]] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            while self._held and self._held[0][0] <= time.monotonic():
                self._pub.send_multipart(self._held.popleft()[1])
            if not self._sub.poll(5 if self._held else 50):
                continue
            frames = self._sub.recv_multipart()
            if self.drop_next.is_set():
                self.drop_next.clear()
                self.dropped.append(int.from_bytes(frames[1], "big"))
                continue
            self._held.append((time.monotonic() + self.delay_s, frames))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sub.close(linger=0)
        self._pub.close(linger=0)
        self._ctx.term()


@pytest.mark.parametrize("replay", [True, False], ids=["replay", "no_replay"])
def test_a_dropped_batch_is_replayed_or_counted_as_a_fall_back_to_the_model(
    tmp_path: Path, fleet: dict[str, Replica], replay: bool
) -> None:
    """All traffic goes to "a" (b serves another model), its events through a forwarder.

    A lost batch is noticed at the next one (numbering is all there is), so
    the request right after the drop is a different tenant, whose prefix the
    lost batch did not carry; the one after continues the dropped tenant.
    """
    a, b = fleet["a"], fleet["b"]
    forwarder = EventForwarder(f"tcp://127.0.0.1:{a.events_port}")
    entry = a.upstream(kv_events=f"tcp://127.0.0.1:{forwarder.port}")
    if not replay:
        entry.pop("kv_events_replay")
    upstreams = [entry, b.upstream(events=False, models=["another-model"])]
    try:
        with serve(create_app(parse_config(kvern_config(tmp_path, upstreams)))) as kvern:
            wait_until_following(kvern, {"a"})
            client = client_for(kvern)
            x, y, z = chats(3)
            turn(client, x, 0)
            time.sleep(0.5)  # its batches are through
            before_drop = kv_events(kvern)["a"]
            forwarder.drop_next.set()
            turn(client, y, 0)  # its prefill's BlockStored is lost
            turn(client, z, 0)  # its batch shows the hole
            # CI: y's next turn once went out before z's batch came, and was
            # predicted from events that did not yet know of the hole.
            noticed = "replayed_batches" if replay else "gaps"
            wait_for_feed(kvern, "a", noticed, before_drop[noticed])
            turn(client, y, 1)  # replayed: exact; else the model answers
            flush(kvern)  # every answer tracked, so its count is in what follows
            after_drop = kv_events(kvern)["a"]
            if not replay:
                reset_prefix_cache(a.url)  # AllBlocksCleared: a known state again
                turn(client, x, 1)
                turn(client, x, 2)
            flush(kvern)
            final = kv_events(kvern)["a"]
    finally:
        forwarder.close()
    assert len(forwarder.dropped) == 1
    table = rows(tmp_path / "kvern.db")
    assert {r["upstream"] for r in table} == {"a"}
    models = [r["backend_model"] for r in table]
    predicted = [r["predicted_cached_tokens"] for r in table]
    reported = [r["reported_cached_tokens"] for r in table]
    if replay:
        assert after_drop["replayed_batches"] > before_drop["replayed_batches"]
        assert after_drop["gaps"] == before_drop["gaps"] == 0
        assert after_drop["exact"] and after_drop["fallbacks"] == 0
        assert models[1:] == ["events"] * 3 and predicted == reported, (models, predicted, reported)
        assert reported[3] >= BLOCK  # y's second turn reused what the lost batch stored
    else:
        assert after_drop["gaps"] == before_drop["gaps"] + 1 and not after_drop["exact"]
        assert after_drop["fallbacks"] == 1 and after_drop["answers"]["model"] >= 1
        assert models[3] == "routed"  # y's second turn: the model, not the broken events
        assert final["exact"] and final["cleared"] >= 1  # whole again after the clear
        assert models[5] == "events" and predicted[5] == reported[5] >= BLOCK


def test_a_burst_of_new_sessions_follows_the_first_while_its_blocks_are_not_in_the_events(
    tmp_path: Path, fleet: dict[str, Replica]
) -> None:
    """A tenant's new sessions, sent while the first one's blocks are not yet in the events.

    vLLM publishes a block once computed, and here every batch reaches kvern
    1.5 s late: the sessions after the first find its system prompt in no
    replica's events. They must still go where the first went (what kvern
    routed there counts until a batch after it comes), and be served its
    prefix from cache there, not compute it on the other replica.
    """
    forwarders = {
        n: EventForwarder(f"tcp://127.0.0.1:{r.events_port}", delay_s=1.5) for n, r in fleet.items()
    }
    upstreams = [
        r.upstream(kv_events=f"tcp://127.0.0.1:{forwarders[n].port}", max_concurrency=4)
        for n, r in fleet.items()
    ]
    sessions = [
        [
            {"role": "system", "content": system_prompt(9)},
            {"role": "user", "content": f"Hi, this is session {k}."},
        ]
        for k in range(4)
    ]
    try:
        with serve(create_app(parse_config(kvern_config(tmp_path, upstreams)))) as kvern:
            wait_until_following(kvern, {"a", "b"})
            client = client_for(kvern)
            for history in chats(2):  # the tokenizer is loaded, both replicas have batches
                turn(client, history, 0)
            for name in fleet:
                wait_for_feed(kvern, name, "batches", 0)
            flush(kvern)
            warm = len(rows(tmp_path / "kvern.db"))
            with ThreadPoolExecutor(len(sessions)) as pool:
                sent = []
                for history in sessions:  # a burst: all within the events' delay
                    sent.append(pool.submit(turn, client, history, 0))
                    time.sleep(0.2)
                for done in sent:
                    done.result()
            flush(kvern)
    finally:
        for forwarder in forwarders.values():
            forwarder.close()
    burst = rows(tmp_path / "kvern.db")[warm:]
    burst.sort(key=lambda r: r["ts_s"])
    keys = ("upstream", "route_reason", "predicted_cached_tokens", "reported_cached_tokens")
    shown = [tuple(r[k] for k in keys) for r in burst]
    print("burst:", shown)
    assert len(burst) == len(sessions)
    assert len({r["upstream"] for r in burst}) == 1, shown  # all where the first went
    for r in burst[1:]:  # the system prompt served from cache, as predicted
        assert r["reported_cached_tokens"] >= 8 * BLOCK, shown
        assert r["predicted_cached_tokens"] == r["reported_cached_tokens"], shown


EVENTS_SYSTEM = " ".join(
    f"Rule {i}: answer in plain words and cite section {i}." for i in range(30)
)


async def _tokens(client: httpx.AsyncClient, messages: list[dict[str, str]]) -> list[int]:
    body = {"model": SERVED_MODEL, "messages": messages, "add_generation_prompt": True}
    response = await client.post("/tokenize", json=body)
    response.raise_for_status()
    return list(response.json()["tokens"])


async def _cached_tokens(client: httpx.AsyncClient, messages: list[dict[str, str]]) -> int:
    body = {"model": SERVED_MODEL, "messages": messages, "max_tokens": 1, "temperature": 0}
    response = await client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    details = response.json()["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


async def test_presence_from_a_real_vllms_events_predicts_its_cached_tokens(
    fleet: dict[str, Replica],
) -> None:
    """vLLM's own events, decoded with no kvern between, say what its next request reports cached.

    On replica "a" of the module's fleet, by a subscriber of the test's own.
    """
    replica = fleet["a"]
    presence, gaps = EventPresence(), []
    seen: list[KvEventBatch] = []

    def on_batch(item: KvEventBatch) -> None:
        seen.append(item)
        presence.apply(item)
        presence.check_invariants()

    subscriber = KvEventSubscriber(
        f"tcp://127.0.0.1:{replica.events_port}",
        replay_endpoint=f"tcp://127.0.0.1:{replica.replay_port}",
        topic=TOPIC,
        on_batch=on_batch,
        on_reset=presence.reset,
        on_gap=lambda first, last: gaps.append((first, last)),
        on_replay=presence.note_replay,
    )
    subscriber.start()
    try:
        async with httpx.AsyncClient(base_url=replica.url, timeout=60) as client:
            first = [
                {"role": "system", "content": EVENTS_SYSTEM},
                {"role": "user", "content": "Hi"},
            ]
            second = [
                {"role": "system", "content": EVENTS_SYSTEM},
                {"role": "user", "content": "Why?"},
            ]
            tokens = await _tokens(client, first)
            assert await _cached_tokens(client, first) == 0
            full_blocks = len(tokens) // BLOCK
            await until(lambda: presence.held_tokens(tokens) == full_blocks * BLOCK)
            # What vLLM serves from cache: the held blocks, short of the last token.
            for messages in (first, second):
                ids = await _tokens(client, messages)
                predicted = min(presence.held_tokens(ids), (len(ids) - 1) // BLOCK * BLOCK)
                assert predicted > 0
                assert await _cached_tokens(client, messages) == predicted
            stores = [e for b in seen for e in b.events if isinstance(e, BlockStored)]
            assert stores and {e.block_size for e in stores} == {BLOCK}
            assert all(isinstance(h, (bytes, int)) for e in stores for h in e.block_hashes)
            assert subscriber.stats.decode_errors == 0 and gaps == []
            held_before, cleared_before = len(presence), presence.stats.cleared
            reset_prefix_cache(replica.url)
            # The clear is published with the engine's next step: give it one.
            other = [{"role": "user", "content": "Something else entirely."}]
            await _cached_tokens(client, other)
            await until(lambda: presence.stats.cleared > cleared_before)
            assert held_before > 0 and presence.held_tokens(tokens) == 0
            assert len(presence) <= len(await _tokens(client, other)) // BLOCK
    finally:
        await subscriber.close()


def test_a_replica_killed_under_traffic_fails_over_and_its_presence_is_rebuilt_from_events(
    tmp_path: Path, fleet: dict[str, Replica]
) -> None:
    """The done criterion of issue 16: kill "a" mid-traffic, restart it on the same ports."""
    a = fleet["a"]
    config = kvern_config(tmp_path, [r.upstream() for r in fleet.values()])
    outcomes: list[tuple[bool, bool, str | None]] = []  # (started streaming, finished, upstream)

    def one(client: openai.OpenAI, history: list[dict[str, str]]) -> None:
        started = finished = False
        upstream = None
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=SERVED_MODEL,
                messages=history,  # type: ignore[arg-type]
                max_tokens=12,
                temperature=0,
                stream=True,
            )
            upstream = raw.headers.get("x-kvern-upstream")
            for chunk in raw.parse():
                started = True
                finished = finished or bool(chunk.choices and chunk.choices[0].finish_reason)
        except openai.APIError:
            pass
        outcomes.append((started, finished, upstream))

    stop = threading.Event()

    def traffic(client: openai.OpenAI, histories: list[list[dict[str, str]]]) -> None:
        n = 0
        while not stop.is_set():
            one(client, histories[n % len(histories)])
            n += 1
            time.sleep(0.2)  # steady, and light enough not to slow the restart

    with serve(create_app(parse_config(config))) as kvern:
        wait_until_following(kvern, {"a", "b"})
        client = client_for(kvern)
        histories = chats(4)
        for n, history in enumerate(histories):
            turn(client, history, n)  # both replicas hold some tenants now
        before = kv_events(kvern)["a"]
        assert before["exact"] and before["blocks_held"] > 0
        worker = threading.Thread(target=traffic, args=(client, histories))
        worker.start()
        try:
            time.sleep(2)
            a.kill()  # SIGKILL: no goodbye, as a crashed replica
            time.sleep(3)
            down = kv_events(kvern)["a"]
            a.start()  # the same HTTP, PUB and replay ports, an empty cache
            time.sleep(2)  # kvern's health check sees it back
        finally:
            stop.set()
            worker.join()
        # New tenants: the restarted replica, idle and empty, is where misses go.
        fresh = chats(4, first=10)
        flush(kvern)
        mark = len(rows(tmp_path / "kvern.db"))
        for n in range(2):
            for history in fresh:
                turn(client, history, n)
        flush(kvern)
        after = kv_events(kvern)["a"]
    # No request failed that had not started streaming (kvern failed over before the first byte).
    assert outcomes and not [o for o in outcomes if not o[0]], outcomes
    assert sum(1 for o in outcomes if o[1]) >= len(outcomes) - 1
    # The dead replica's presence was put in doubt, then cleared by the new engine's numbering.
    assert down["disconnects"] >= 1 and not down["exact"], down
    assert after["resets"] >= 1 and after["exact"] and after["gaps"] == 0, after
    # Rebuilt from the new engine's events: its predictions are right again.
    table = rows(tmp_path / "kvern.db")[mark:]
    on_a = [r for r in table if r["upstream"] == "a" and r["route_attempts"] == 1]
    assert len(on_a) >= 2, [(r["upstream"], r["route_attempts"]) for r in table]
    assert any(r["backend_model"] == "events" for r in on_a)
    for row in table:
        if row["backend_model"] == "events" and row["route_attempts"] == 1:
            assert row["predicted_cached_tokens"] == row["reported_cached_tokens"], row
    assert any(r["reported_cached_tokens"] >= BLOCK for r in on_a if r["backend_model"] == "events")
