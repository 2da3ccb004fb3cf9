"""``kvern doctor``'s ``routing.shared_state`` lines, against a real ``redis-server``.

The store is started here (tests/redis_server.py); the instances whose load
the doctor counts publish through kvern's own
:class:`~kvern.routing.shared_load.SharedLoad`; the unreachable stores are a
port nobody listens on and one whose peer never says a byte.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kvern.config import HealthConfig, RoutingConfig, UpstreamEntry
from kvern.doctor.report import Check
from kvern.doctor.shared_state_checks import check_shared_state
from kvern.routing.pool import UpstreamPool
from kvern.routing.shared_load import SharedLoad
from tests.redis_server import RedisServer, redis_server
from tests.servers import blackhole, free_port


def lines(checks: list[Check]) -> list[str]:
    return [c.line() for c in checks]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as server:
        yield server


# -- routing.shared_state ----------------------------------------------------------------


async def test_no_shared_state_is_one_ok_line_saying_it_is_not_used() -> None:
    assert lines(await check_shared_state(RoutingConfig(), timeout_s=5)) == [
        "✓ shared state: not used (routing.shared_state unset): kvern routes on its own load"
    ]


async def test_a_reachable_store_is_ok_with_its_version_and_round_trip(store: RedisServer) -> None:
    checks = await check_shared_state(RoutingConfig(shared_state=store.url), timeout_s=5)
    assert [c.status for c in checks] == ["ok", "ok"]
    reach, fleet = lines(checks)
    assert reach.startswith(f"✓ shared state: {store.url}: redis 7.") and "round trip" in reach
    assert fleet == (
        "✓ shared state fleet: no instance publishing load under prefix 'kvern' yet "
        "(none is running, or they use another prefix)"
    )


async def test_a_round_trip_over_half_the_publish_interval_is_a_warning(
    store: RedisServer,
) -> None:
    config = RoutingConfig(shared_state=store.url, shared_state_publish_ms=0.0001)
    reach = (await check_shared_state(config, timeout_s=5))[0]
    assert reach.status == "warn"
    assert "more than half of shared_state_publish_ms (0.0001 ms)" in reach.message
    assert reach.fix is not None and "routing.shared_state_publish_ms" in reach.fix


async def test_an_unused_port_fails_naming_the_url_without_its_password() -> None:
    pytest.importorskip("redis")
    url = f"redis://kvern:s3cret@127.0.0.1:{free_port()}/0"
    (check,) = await check_shared_state(RoutingConfig(shared_state=url), timeout_s=5)
    assert check.status == "fail" and "s3cret" not in check.line()
    assert check.message.startswith(f"redis://***@127.0.0.1:{url.rsplit(':', 1)[1]}: unreachable")
    assert check.fix is not None and "redis-server" in check.fix


async def test_a_wrong_password_is_an_authentication_failure(store: RedisServer) -> None:
    admin = store.client()
    admin.config_set("requirepass", "right")
    admin.close()
    url = f"redis://:wrong@127.0.0.1:{store.port}/0"
    (check,) = await check_shared_state(RoutingConfig(shared_state=url), timeout_s=5)
    assert check.status == "fail" and "wrong" not in check.line()
    assert "authentication refused" in check.message
    (no_password,) = await check_shared_state(RoutingConfig(shared_state=store.url), timeout_s=5)
    assert no_password.status == "fail" and "authentication refused" in no_password.message


async def test_a_store_that_never_answers_fails_within_its_deadline() -> None:
    pytest.importorskip("redis")
    with blackhole() as url:
        config = RoutingConfig(
            shared_state=url.replace("http://", "redis://") + "/0", shared_state_timeout_ms=200
        )
        started_s = time.perf_counter()
        (check,) = await check_shared_state(config, timeout_s=5)
    assert time.perf_counter() - started_s < 2.0
    assert check.status == "fail" and "no answer within 200 ms" in check.message


def test_without_redis_py_it_fails_saying_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis now raises ImportError
    config = RoutingConfig(shared_state="redis://u:p@127.0.0.1:1/0")
    (check,) = asyncio.run(check_shared_state(config, timeout_s=5))
    assert check.status == "fail" and check.fix is not None
    assert "pip install 'kvern[redis]'" in check.fix and ":p@" not in check.line()


@contextmanager
def instances_publishing(url: str, prefix: str, count: int) -> Iterator[list[SharedLoad]]:
    """``count`` instances' load links (kvern's own publisher), each with a pool of one."""
    config = RoutingConfig(
        shared_state=url,
        shared_state_prefix=prefix,
        shared_state_publish_ms=20,
        shared_state_stale_ms=300,
    )
    links = [
        SharedLoad(
            UpstreamPool([UpstreamEntry(name="r0", url="http://127.0.0.1:9/v1")], HealthConfig()),
            config,
        )
        for _ in range(count)
    ]
    for link in links:
        link.start()
    try:
        yield links
    finally:
        for link in links:
            link.close()


async def until_counted(config: RoutingConfig, said: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        fleet = (await check_shared_state(config, timeout_s=5))[1]
        if fleet.message == said:
            assert fleet.status == "ok"
            return
        assert time.monotonic() < deadline, f"still {fleet.message!r}, not {said!r}"
        await asyncio.sleep(0.05)


async def test_instances_publishing_load_are_counted_and_a_stopped_one_drops_out(
    store: RedisServer,
) -> None:
    config = RoutingConfig(shared_state=store.url, shared_state_prefix="fleet")
    with instances_publishing(store.url, "fleet", 2) as links:
        await until_counted(config, "2 instances publishing load under prefix 'fleet'")
        links[0].close()  # its key expires after shared_state_stale_ms
        await until_counted(config, "1 instance publishing load under prefix 'fleet'")
    other = RoutingConfig(shared_state=store.url, shared_state_prefix="elsewhere")
    assert "no instance publishing" in (await check_shared_state(other, timeout_s=5))[1].message
