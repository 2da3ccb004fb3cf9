"""Two kvern instances in front of the same four replicas route as one, through a real Redis.

The openai client -> kvern A or kvern B -> four simulated vLLM-like replicas
(tests/replica_sim.py: a real 16-token block prefix cache, the real Qwen2.5
tokenizer and template). A and B share ``routing.shared_state``, a real
``redis-server`` started here; it is killed and started again mid-module to
check that routing fails open and that sharing resumes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from kvern.app import create_app
from kvern.config import parse_config
from tests.redis_server import RedisServer, redis_server
from tests.replica_sim import ReplicaState
from tests.servers import serve
from tests.test_routing_e2e import (
    MODEL,
    chat_turn,
    client_for,
    replicas,
    routed_config,
    system_prompt,
)
from tests.test_shared_state import wait_until

pytestmark = pytest.mark.slow


@dataclass
class Fleet:
    store: RedisServer
    reps: list[tuple[str, ReplicaState]]
    urls: dict[str, str]  # "A" / "B" -> base URL
    apps: dict[str, Any]

    def health(self, name: str) -> dict[str, Any]:
        response = httpx.get(self.urls[name] + "/health", timeout=10)
        return dict(response.json())

    def shared(self, name: str) -> dict[str, Any]:
        shared = self.health(name)["routing"]["shared_state"]
        assert shared is not None
        return dict(shared)

    def client(self, name: str) -> openai.OpenAI:
        return client_for(self.urls[name])


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    hf_tokenizers: dict[str, Any],
    tokenizer_fixtures: dict[str, Any],
) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("shared")
    with ExitStack() as stack:
        store = stack.enter_context(redis_server(base))
        reps = stack.enter_context(replicas(hf_tokenizers["qwen2"], n=4))
        tok_dir = str(tokenizer_fixtures["qwen2"].directory)
        urls, apps = {}, {}
        for name in ("A", "B"):
            directory = base / name
            directory.mkdir()
            data = routed_config(
                directory,
                [u for u, _ in reps],
                tok_dir,
                shared_state=store.url,
                shared_state_prefix="e2e",
                shared_state_publish_ms=20,
                shared_state_stale_ms=500,
                shared_state_timeout_ms=200,
            )
            apps[name] = create_app(parse_config(data))
            urls[name] = stack.enter_context(serve(apps[name]))
        fleet = Fleet(store, reps, urls, apps)
        for name in urls:  # load each instance's tokenizer before routing on it
            fleet.client(name).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "warm up"}], max_tokens=1
            )
            httpx.get(urls[name] + "/trie/visualize", params={"wait_s": 20}, timeout=30)
        for name in urls:
            wait_until(lambda n=name: fleet.shared(n)["load"]["connected"], what="load link")
            wait_until(lambda n=name: fleet.shared(n)["presence"]["connected"], what="stream")
        yield fleet


def wait_shared(fleet: Fleet) -> None:
    """Until each instance has read everything the other published (nothing left queued).

    Called between turns: a user reads an answer before replying, and the
    stream carries each turn in a few milliseconds.
    """

    def done() -> bool:
        views = {name: fleet.shared(name)["presence"] for name in fleet.urls}
        a, b = views["A"], views["B"]
        return (
            a["queued"] == 0
            and b["queued"] == 0
            and b["received"] >= a["published"]
            and a["received"] >= b["published"]
        )

    wait_until(done, what="each instance reading the other's stream entries")


def sessions_through_both(fleet: Fleet, tenants: range) -> dict[int, list[Any]]:
    """Turn 1 of every tenant through A, turn 2 through B, turn 3 through A again.

    Returns, per tenant, (instance, upstream, reported cached tokens) per turn.
    """
    histories = {t: [{"role": "system", "content": system_prompt(t)}] for t in tenants}
    seen: dict[int, list[Any]] = {t: [] for t in tenants}
    for turn, name in enumerate("ABA"):
        wait_shared(fleet)
        for t in tenants:
            histories[t].append({"role": "user", "content": f"Question {turn} for {t}?"})
            upstream, answer, cached = chat_turn(fleet.client(name), histories[t])
            histories[t].append({"role": "assistant", "content": answer})
            seen[t].append((name, upstream, cached))
    return seen


def test_turns_alternating_between_instances_stay_on_one_replica_and_hit_its_cache(
    fleet: Fleet,
) -> None:
    seen = sessions_through_both(fleet, range(6))
    for tenant, turns in seen.items():
        assert len({upstream for _, upstream, _ in turns}) == 1, (tenant, turns)
        assert all(cached > 0 for _, _, cached in turns[1:]), (tenant, turns)
    used = {turns[0][1] for turns in seen.values()}
    assert len(used) >= 3, used  # six new tenants spread by load over four replicas
    view = fleet.shared("B")["presence"]
    assert view["skipped"] == 0 and view["dropped"] == 0 and view["hashes"] > 0


def test_an_instance_routes_around_the_load_another_instance_put_on_the_replicas(
    fleet: Fleet,
) -> None:
    states = [state for _, state in fleet.reps]
    for state in states:
        state.fail_mode = "hang"
    results: list[Any] = []

    def ask(i: int) -> None:
        messages = [{"role": "user", "content": f"A long-running question number {i}"}]
        results.append(chat_turn(fleet.client("A"), messages))

    workers = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    try:
        for w in workers:
            w.start()
        wait_until(lambda: sum(s.hanging for s in states) == 3, what="A's three requests held")
        free = [i for i, s in enumerate(states) if s.hanging == 0]
        assert len(free) == 1, [s.hanging for s in states]
        # B's candidates carry A's in-flight requests.
        router_b = fleet.apps["B"].state.services.router

        def b_sees_a() -> bool:
            cands = router_b.candidates(MODEL)
            return sum(c.in_flight for c in cands) == 3

        wait_until(b_sees_a, what="A's load in B's candidates")
        others = fleet.shared("B")["load"]["others_load"]
        assert sum(u["in_flight"] for u in others.values()) == 3
        assert others[f"r{free[0]}"]["in_flight"] == 0
        states[free[0]].fail_mode = None
        # A new prompt through B goes where A left room, not onto a busy replica.
        for i in range(3):
            messages = [{"role": "user", "content": f"Something unrelated {i}"}]
            upstream, _, _ = chat_turn(fleet.client("B"), messages)
            assert upstream == f"r{free[0]}"
    finally:
        for state in states:
            state.fail_mode = None
        for w in workers:
            w.join(timeout=30)
    assert len(results) == 3


def test_with_the_store_killed_requests_succeed_on_local_state_and_sharing_resumes_after(
    fleet: Fleet,
) -> None:
    before = fleet.shared("B")["load"]["fail_open"]
    fleet.store.kill()
    wait_until(lambda: fleet.shared("B")["load"]["stale"], what="B's load copy going stale")
    tenants = range(20, 24)
    histories = {t: [{"role": "system", "content": system_prompt(t)}] for t in tenants}
    for turn, name in enumerate("ABAB"):
        for t in tenants:
            histories[t].append({"role": "user", "content": f"Question {turn} for {t}?"})
            started_s = time.perf_counter()
            _, answer, _ = chat_turn(fleet.client(name), histories[t])  # raises if it failed
            assert time.perf_counter() - started_s < 5.0  # no store deadline on the way
            histories[t].append({"role": "assistant", "content": answer})
    down = fleet.shared("B")
    assert not down["load"]["connected"] and down["load"]["fail_open"] > before
    assert not down["presence"]["connected"] and down["presence"]["stale"]
    metrics = httpx.get(fleet.urls["B"] + "/metrics", timeout=10).text
    assert 'kvern_shared_state_connected{part="load"} 0.0' in metrics
    assert 'kvern_shared_state_connected{part="presence"} 0.0' in metrics
    assert 'kvern_shared_state_fail_open_total{part="load"}' in metrics

    fleet.store.start()  # empty, as after a crash
    for name in ("A", "B"):
        wait_until(lambda n=name: fleet.shared(n)["load"]["connected"], what="load reconnected")
        wait_until(lambda n=name: fleet.shared(n)["presence"]["connected"], what="reconnected")
    seen = sessions_through_both(fleet, range(40, 44))
    for tenant, turns in seen.items():
        assert len({upstream for _, upstream, _ in turns}) == 1, (tenant, turns)
        assert all(cached > 0 for _, _, cached in turns[1:]), (tenant, turns)
    back = fleet.shared("B")
    assert back["load"]["reconnects"] >= 1 and not back["load"]["stale"]
    assert back["load"]["other_instances"] == 1
