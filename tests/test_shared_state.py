"""Shared state between kvern instances: chain hashes, the fleet's load and presence, a real Redis.

The store is a real ``redis-server`` on 127.0.0.1 (tests/redis_server.py),
killed and restarted where a test needs the store to fail.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kvern.config import (
    ConfigError,
    HealthConfig,
    RoutingConfig,
    UpstreamEntry,
    load_config,
    parse_config,
)
from kvern.routing.block_chains import ChainIndex, chain_hashes, token_bytes
from kvern.routing.pool import UpstreamPool
from kvern.routing.presence_match import UpstreamCache
from kvern.routing.router import Router
from kvern.routing.shared_load import SharedLoad
from kvern.routing.shared_state import require_redis
from kvern.tracking.shared_presence import SharedPresence
from tests.redis_server import RedisServer, redis_server
from tests.servers import blackhole

MODEL = "m"
BLOCK = 16


def wait_until(check: Callable[[], Any], timeout_s: float = 10.0, what: str = "") -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.02)


def routing(url: str, prefix: str, **extra: Any) -> RoutingConfig:
    settings: dict[str, Any] = {
        "shared_state": url,
        "shared_state_prefix": prefix,
        "shared_state_publish_ms": 20,
        "shared_state_stale_ms": 300,
        "shared_state_timeout_ms": 200,
        **extra,
    }
    return RoutingConfig(**settings)


def pool(n: int = 2, capacity_tokens: int = 64_000) -> UpstreamPool:
    entries = [
        UpstreamEntry(
            name=f"r{i}",
            url=f"http://127.0.0.1:9/v{i}",
            kv_capacity_tokens=capacity_tokens,
            block_size=BLOCK,
        )
        for i in range(n)
    ]
    return UpstreamPool(entries, HealthConfig())


def caches(capacity_tokens: int = 64_000) -> list[UpstreamCache]:
    return [UpstreamCache(f"r{i}", capacity_tokens, BLOCK) for i in range(2)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as server:
        yield server


@contextmanager
def started(*links: Any) -> Iterator[None]:
    for link in links:
        link.start()
    try:
        yield
    finally:
        for link in links:
            link.close()


# -- chain hashes and the index (pure) ----------------------------------------------


def test_chain_hashes_agree_on_the_same_ids_and_part_from_the_first_changed_block() -> None:
    ids = list(range(100, 180))  # five full blocks
    other = list(ids)
    other[40] = 7  # in block 2
    same = chain_hashes(token_bytes(ids), BLOCK)
    assert same == chain_hashes(token_bytes(array("i", ids)), BLOCK)
    changed = chain_hashes(token_bytes(other), BLOCK)
    assert len(same) == 5 and same[:2] == changed[:2]
    assert all(a != b for a, b in zip(same[2:], changed[2:], strict=True))
    # Computed in pieces from a parent, the chain is the same.
    tail = chain_hashes(token_bytes(ids), BLOCK, start=2, parent=same[1])
    assert same[2:] == tail


def test_the_index_answers_the_longest_prefix_other_instances_sent_to_each_upstream() -> None:
    index = ChainIndex(caches())
    turn1 = list(range(1000, 1000 + 5 * BLOCK + 3))
    index.add(MODEL, "r1", BLOCK, chain_hashes(token_bytes(turn1), BLOCK))
    turn2 = turn1 + list(range(5000, 5000 + 3 * BLOCK))
    assert index.held_tokens(MODEL, "r1", turn2) == 5 * BLOCK
    assert index.held_tokens(MODEL, "r0", turn2) is None  # nothing shared about r0
    assert index.held_tokens("other-model", "r1", turn2) is None
    assert index.held_tokens(MODEL, "r1", list(range(9000, 9100))) == 0
    index.check_invariants()


def test_the_index_keeps_an_upstream_within_its_blocks_and_evicts_the_oldest_chains() -> None:
    index = ChainIndex(caches(capacity_tokens=6 * BLOCK))  # six blocks per upstream
    first = list(range(0, 4 * BLOCK))
    second = list(range(10_000, 10_000 + 4 * BLOCK))
    index.add(MODEL, "r0", BLOCK, chain_hashes(token_bytes(first), BLOCK))
    index.add(MODEL, "r0", BLOCK, chain_hashes(token_bytes(second), BLOCK))
    index.check_invariants()
    assert index.held_tokens(MODEL, "r0", second) == 4 * BLOCK
    # The older chain lost its tail first: its first two blocks are still held.
    assert index.held_tokens(MODEL, "r0", first) == 2 * BLOCK
    assert index.stats()["evicted"] == 2


def test_an_upstream_that_went_down_is_forgotten_for_every_model() -> None:
    index = ChainIndex(caches())
    ids = list(range(4 * BLOCK))
    for model in ("m1", "m2"):
        for upstream in ("r0", "r1"):
            index.add(model, upstream, BLOCK, chain_hashes(token_bytes(ids), BLOCK))
    index.drop_upstream("r0")
    assert index.held_tokens("m1", "r0", ids) is None and index.held_tokens("m2", "r0", ids) is None
    assert index.held_tokens("m1", "r1", ids) == 4 * BLOCK


def test_the_index_refuses_an_upstream_it_does_not_know_or_another_block_size() -> None:
    index = ChainIndex(caches())
    hashes = chain_hashes(token_bytes(list(range(64))), 32)
    assert not index.add(MODEL, "elsewhere", BLOCK, hashes)
    assert not index.add(MODEL, "r0", 32, hashes)
    assert index.stats()["hashes"] == 0


# -- configuration ---------------------------------------------------------------------


def test_shared_state_takes_a_redis_url_and_names_the_key_otherwise() -> None:
    with pytest.raises(ConfigError, match="routing.shared_state"):
        parse_config({"routing": {"shared_state": "http://localhost:6379"}})
    config = parse_config({"routing": {"shared_state": "redis://127.0.0.1:6379/2"}})
    assert config.routing.shared_state == "redis://127.0.0.1:6379/2"
    assert parse_config({}).routing.shared_state is None
    with pytest.raises(ConfigError, match="at least twice shared_state_publish_ms"):
        parse_config({"routing": {"shared_state_publish_ms": 600, "shared_state_stale_ms": 1000}})


def test_shared_state_without_redis_py_is_a_config_error_saying_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis now raises ImportError
    with pytest.raises(ConfigError, match=r"kvern\[redis\]"):
        require_redis(RoutingConfig(shared_state="redis://127.0.0.1:1/0"))
    assert require_redis(RoutingConfig()) is None


# -- the fleet's load, through a real redis-server ------------------------------------------


def test_an_instance_sees_the_other_instances_load_and_never_its_own(store: RedisServer) -> None:
    config = routing(store.url, "load1")
    pool_a, pool_b = pool(), pool()
    a, b = SharedLoad(pool_a, config), SharedLoad(pool_b, config)
    with started(a, b):
        pool_a.replicas[1].load.reserve("req-1", 900, time.time())
        pool_a.replicas[1].load.reserve("req-2", 100, time.time())
        seen = wait_until(lambda: (b.others() or {}).get("r1"), what="A's load on r1 in B's copy")
        assert (seen.in_flight, seen.prefill_tokens, seen.decoding) == (2, 1000, 0)
        assert seen.demand > 0
        # B's candidates carry A's load; A's carry only its own (no double count).
        router_b = Router(pool_b, config, "least_load", oracle=None, shared_load=b)  # type: ignore[arg-type]
        by_name = {c.replica.name: c for c in router_b.candidates(None)}
        assert by_name["r1"].in_flight == 2 and by_name["r1"].load > by_name["r0"].load
        mine = wait_until(lambda: a.others(), what="B's (idle) load in A's copy")
        assert mine["r1"].in_flight == 0  # A's own load is not in A's copy
        pool_a.replicas[1].load.first_byte("req-1")
        wait_until(lambda: (b.others() or {})["r1"].decoding == 1, what="the first byte")
        pool_a.replicas[1].load.end("req-1")
        pool_a.replicas[1].load.end("req-2")
        wait_until(lambda: (b.others() or {})["r1"].in_flight == 0, what="the end")
        view = b.view()
    assert view["connected"] and not view["stale"] and view["other_instances"] == 1
    assert view["errors"] == 0 and view["fail_open"] <= 2  # only before the first read


def test_a_dead_store_fails_open_to_local_load_and_sharing_resumes_when_it_is_back(
    store: RedisServer,
) -> None:
    config = routing(store.url, "load2")
    pool_a, pool_b = pool(), pool()
    a, b = SharedLoad(pool_a, config), SharedLoad(pool_b, config)
    with started(a, b):
        pool_a.replicas[0].load.reserve("req-1", 500, time.time())
        wait_until(lambda: "r0" in (b.others() or {}), what="A's load before the kill")
        store.kill()
        before = b.fail_open
        started_s = time.perf_counter()
        wait_until(lambda: b.others() is None, what="B's copy going stale")
        # Reading the copy never waits on the store, dead or not.
        for _ in range(100):
            b.others()
        assert (time.perf_counter() - started_s) < 2.0
        assert b.fail_open >= before + 100
        down = b.view()
        assert not down["connected"] and down["stale"] and down["errors"] >= 1
        assert down["others_load"] == {}
        store.start()
        back = wait_until(lambda: (b.others() or {}).get("r0"), what="sharing after the restart")
        assert back.in_flight == 1 and back.prefill_tokens == 500
        assert b.view()["reconnects"] >= 1


def test_a_store_that_never_answers_costs_a_decision_nothing(tmp_path: Path) -> None:
    pytest.importorskip("redis")
    with blackhole() as url:
        config = routing(url.replace("http://", "redis://") + "/0", "load3")
        shared = SharedLoad(pool(), config)
        with started(shared):
            started_s = time.perf_counter()
            for _ in range(1000):
                assert shared.others() is None
            assert time.perf_counter() - started_s < 0.5
            wait_until(lambda: shared.stats.errors >= 1, what="the connect deadline")
            closing = time.perf_counter()
        assert time.perf_counter() - closing < 3.0  # closed within a deadline or two
        assert shared.fail_open == 1000 and not shared.stats.connected
        assert "Timeout" in (shared.stats.last_error or "")


# -- presence, through a real redis-server ---------------------------------------------------


def test_a_prompt_one_instance_routed_is_held_for_the_others_at_that_upstream(
    store: RedisServer,
) -> None:
    config = routing(store.url, "presence1")
    a, b = SharedPresence(config, caches()), SharedPresence(config, caches())
    with started(a, b):
        turn1 = array("i", range(2000, 2000 + 6 * BLOCK + 5))
        a.publish(MODEL, "r1", turn1)
        turn2 = list(turn1) + list(range(7000, 7000 + 2 * BLOCK))
        wait_until(lambda: b.held_tokens(MODEL, "r1", turn2), what="A's chain at B")
        assert b.held_tokens(MODEL, "r1", turn2) == 6 * BLOCK
        assert not b.held_tokens(MODEL, "r0", turn2)
        b.publish(MODEL, "r0", turn2)
        wait_until(lambda: a.held_tokens(MODEL, "r0", turn2), what="B's chain at A")
        assert a.held_tokens(MODEL, "r0", turn2) == 8 * BLOCK
        time.sleep(0.3)  # each has read its own entry by now: never kept
        assert a.held_tokens(MODEL, "r1", turn2) is None
        assert b.held_tokens(MODEL, "r0", turn2) is None
        view = b.view()
    assert view["connected"] and view["published"] == 1 and view["received"] == 1
    assert view["dropped"] == 0 and view["skipped"] == 0


def test_a_new_instance_reads_back_where_prompts_went_before_it_started(
    store: RedisServer,
) -> None:
    config = routing(store.url, "presence2")
    a = SharedPresence(config, caches())
    ids = list(range(300, 300 + 4 * BLOCK))
    with started(a):
        a.publish(MODEL, "r0", ids)
        wait_until(lambda: a.view()["published"] == 1, what="the publish")
        late = SharedPresence(config, caches())
        with started(late):
            wait_until(lambda: late.held_tokens(MODEL, "r0", ids), what="the stream's backlog")


def test_a_full_hand_off_queue_drops_and_counts_and_never_blocks_the_tracking_thread(
    store: RedisServer,
) -> None:
    config = routing(store.url, "presence3")
    shared = SharedPresence(config, caches(), queue_size=2)
    store.kill()  # the writer cannot drain: the queue fills
    with started(shared):
        ids = array("i", range(10 * BLOCK))
        started_s = time.perf_counter()
        for _ in range(50):
            shared.publish(MODEL, "r0", ids)
            assert shared.held_tokens(MODEL, "r0", ids) is None
        assert time.perf_counter() - started_s < 0.5
        view = shared.view()
    assert view["dropped"] >= 47 and not view["connected"]
    assert shared.fail_open >= 1  # lookups made while the reader had nothing fresh


def test_presence_sharing_resumes_on_a_restarted_store(store: RedisServer) -> None:
    config = routing(store.url, "presence4")
    a, b = SharedPresence(config, caches()), SharedPresence(config, caches())
    first = list(range(0, 3 * BLOCK))
    second = list(range(50_000, 50_000 + 5 * BLOCK))
    with started(a, b):
        a.publish(MODEL, "r0", first)
        wait_until(lambda: b.held_tokens(MODEL, "r0", first), what="before the restart")
        store.kill()
        wait_until(lambda: not b.view()["connected"], what="B seeing the store gone")
        store.start()  # empty: a new stream, from id 0 again
        wait_until(lambda: a.view()["connected"] and b.view()["connected"], what="reconnects")
        a.publish(MODEL, "r1", second)
        wait_until(lambda: b.held_tokens(MODEL, "r1", second), what="after the restart")
        assert b.held_tokens(MODEL, "r0", first) == 3 * BLOCK  # kept from before


def test_the_shipped_shared_state_example_is_valid_once_uncommented(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    text = (root / "config.yaml").read_text(encoding="utf-8")
    uncommented = re.sub(r"^  # (shared_state\w*:)", r"  \1", text, flags=re.M)
    assert uncommented.count("\n  shared_state") == 6
    path = tmp_path / "config.yaml"
    path.write_text(uncommented, encoding="utf-8")
    config = load_config(path, env={})
    assert config.routing.shared_state == "redis://127.0.0.1:6379/0"
    assert config.routing.shared_state_stale_ms == 1000


def test_kvern_serve_without_redis_py_stops_with_one_line_saying_what_to_install(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "upstreams:\n"
        "  - {name: r0, url: 'http://127.0.0.1:9/v1'}\n"
        "  - {name: r1, url: 'http://127.0.0.1:10/v1'}\n"
        "routing:\n  shared_state: redis://127.0.0.1:1/0\n",
        encoding="utf-8",
    )
    # redis-py made unimportable in that process only, as where it is not installed.
    script = (
        "import sys; sys.modules['redis'] = None\n"
        "from kvern.__main__ import main\n"
        f"sys.exit(main(['serve', '--config', {str(config)!r}, '--port', '1']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    assert "routing.shared_state" in done.stderr and "kvern[redis]" in done.stderr
    assert "Traceback" not in done.stderr
