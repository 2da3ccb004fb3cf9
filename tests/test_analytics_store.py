"""AnalyticsStore: batching writer, bounded queue, flush/close, migrations, retention."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from kvern.analytics import (
    COLUMNS,
    MIGRATIONS,
    SCHEMA_VERSION,
    AnalyticsStore,
    RequestRecord,
    SchemaTooNewError,
    from_row,
    migrate,
    to_row,
)

NOW_S = 1_700_000_000.0
DAY_S = 86_400.0


def make_record(i: int = 0, **overrides: Any) -> RequestRecord:
    """A minimal valid record; ``i`` makes ids distinct."""
    fields: dict[str, Any] = {
        "request_id": f"req-{i}",
        "ts_s": NOW_S,
        "model": "llama",
        "endpoint": "chat",
        "upstream": "http://upstream:8000",
        "stream": False,
    }
    fields.update(overrides)
    return RequestRecord(**fields)


def full_record() -> RequestRecord:
    """A record with every field set to a distinct, non-default value."""
    return RequestRecord(
        request_id="req-full",
        ts_s=NOW_S + 0.25,
        model="qwen2.5-7b",
        tenant="tenant-hash-1",
        endpoint="ollama_chat",
        upstream="gpu-a",
        stream=True,
        status=200,
        error="client_disconnected",
        prompt_tokens=1234,
        matched_tokens=1000,
        matched_tokens_aligned=992,
        hit=True,
        tokenizer_kind="exact",
        ttfb_ms=12.5,
        latency_ms=345.75,
        completion_tokens=56,
        upstream_prompt_tokens=1236,
        reported_cached_tokens=990,
        reported_cached_source="usage.prompt_tokens_details.cached_tokens",
        finish_reason="stop",
    )


def count_rows(path: Path) -> int:
    """Count rows through an independent connection: sees committed rows only."""
    with closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0])


def read_records(path: Path) -> list[RequestRecord]:
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM requests ORDER BY rowid")
        return [from_row(tuple(row)) for row in rows]


def file_user_version(path: Path) -> int:
    with closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Let the writer run until ``predicate`` holds (tests only; the store never polls)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "timed out waiting for the writer"
        await asyncio.sleep(0.001)


# -- records ---------------------------------------------------------------


def test_columns_follow_the_record_fields_in_order() -> None:
    assert COLUMNS[:3] == ("request_id", "ts_s", "model")
    assert len(COLUMNS) == 40
    assert COLUMNS[-19:-16] == ("predicted_cached_tokens", "backend_model", "block_size")
    assert COLUMNS[-16:-12] == ("route_reason", "route_attempts", "route_load_tokens", "end_user")
    assert COLUMNS[-1] == "route_expected_ttft_ms"
    assert COLUMNS[-12:-7] == (
        "miss_reason",
        "miss_tokens",
        "lost_reason",
        "lost_tokens",
        "novel_tokens",
    )
    assert to_row(full_record())[COLUMNS.index("stream")] == 1


def test_to_row_refuses_unbindable_and_missing_required_values() -> None:
    with pytest.raises(TypeError, match="RequestRecord.model"):
        to_row(make_record(model={"not": "bindable"}))
    with pytest.raises(TypeError, match="RequestRecord.upstream"):
        to_row(make_record(upstream=None))


# -- writing ---------------------------------------------------------------


async def test_every_field_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    sparse = make_record(1)
    async with AnalyticsStore(str(path), retention_days=None) as store:
        assert store.record(full_record())
        assert store.record(sparse)
        await store.flush()
    assert read_records(path) == [full_record(), sparse]


async def test_rows_are_written_in_batches_with_a_commit_each(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    # A long interval: only a full batch (or flush/close) triggers a write.
    store = AnalyticsStore(str(path), batch_size=10, flush_interval_ms=60_000)
    for i in range(25):
        store.record(make_record(i))
    await store.start()
    await wait_until(lambda: store.num_batches == 2)
    # Committed: an independent connection sees both full batches already.
    assert count_rows(path) == 20
    assert store.stats()["queued"] == 0  # the last 5 are in the writer's pending batch
    await store.close()
    assert count_rows(path) == 25
    assert store.stats() == {
        "queued": 0,
        "written": 25,
        "dropped": 0,
        "lost": 0,
        "batches": 3,
        "write_errors": 0,
        "pruned": 0,
    }


async def test_rows_land_after_the_flush_interval_without_flush(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    async with AnalyticsStore(str(path), flush_interval_ms=10) as store:
        store.record(make_record(1))
        store.record(make_record(2))
        await wait_until(lambda: store.num_written == 2)
        assert store.num_batches == 1
        assert count_rows(path) == 2


async def test_flush_makes_rows_visible_without_waiting_for_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    async with AnalyticsStore(str(path), flush_interval_ms=60_000) as store:
        for i in range(3):
            store.record(make_record(i))
        await asyncio.wait_for(store.flush(), timeout=2.0)
        assert count_rows(path) == 3
        assert await store.fetchall("SELECT COUNT(*) FROM requests") == [(3,)]
        # Nothing queued: flush returns at once.
        await asyncio.wait_for(store.flush(), timeout=2.0)


async def test_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    store = AnalyticsStore(str(path), queue_size=3)
    # Not started: nothing drains the queue, like a writer stuck behind a slow disk.
    accepted = [store.record(make_record(i)) for i in range(5)]
    assert accepted == [True, True, True, False, False]
    assert store.stats()["dropped"] == 2
    assert store.stats()["queued"] == 3
    await store.start()
    await store.flush()
    assert store.record(make_record(99))  # room again once the writer drained
    await store.close()
    assert [r.request_id for r in read_records(path)] == ["req-0", "req-1", "req-2", "req-99"]


async def test_close_drains_everything_queued(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    store = AnalyticsStore(str(path), flush_interval_ms=60_000)
    await store.start()
    for i in range(5_000):
        assert store.record(make_record(i))
    await store.close()
    assert count_rows(path) == 5_000
    assert store.num_written == 5_000
    assert store.num_batches == 20  # ceil(5000 / 256): all queued before the writer ran


async def test_close_drains_rows_recorded_between_batches(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    store = AnalyticsStore(str(path), batch_size=16, flush_interval_ms=1)
    await store.start()
    for chunk in range(20):
        for i in range(50):
            store.record(make_record(chunk * 50 + i))
        await asyncio.sleep(0)
    await store.close()
    assert count_rows(path) == 1_000
    assert sorted(int(r.request_id[4:]) for r in read_records(path)) == list(range(1_000))


async def test_record_after_close_begins_is_refused_and_counted(tmp_path: Path) -> None:
    store = AnalyticsStore(str(tmp_path / "a.db"))
    await store.start()
    closing_task = asyncio.create_task(store.close())
    await asyncio.sleep(0)
    assert store.record(make_record(1)) is False
    await closing_task
    assert store.record(make_record(2)) is False
    assert store.num_dropped == 2
    await store.close()  # idempotent


async def test_cancelling_close_does_not_cancel_the_drain(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    store = AnalyticsStore(str(path), batch_size=8)
    await store.start()
    for i in range(500):
        store.record(make_record(i))
    task = asyncio.create_task(store.close())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.close()
    assert count_rows(path) == 500


async def test_close_without_start_counts_queued_rows_as_lost(tmp_path: Path) -> None:
    store = AnalyticsStore(str(tmp_path / "a.db"))
    store.record(make_record(1))
    await store.close()
    assert store.stats()["lost"] == 1
    await store.flush()  # returns, does not hang


async def test_memory_database_works(tmp_path: Path) -> None:
    async with AnalyticsStore(":memory:") as store:
        store.record(make_record(1))
        await store.flush()
        assert await store.fetchall("SELECT request_id FROM requests") == [("req-1",)]


def test_bad_settings_are_value_errors() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        AnalyticsStore(":memory:", batch_size=0)
    with pytest.raises(ValueError, match="queue_size"):
        AnalyticsStore(":memory:", queue_size=0)
    with pytest.raises(ValueError, match="retention_days"):
        AnalyticsStore(":memory:", retention_days=0)


# -- write errors ----------------------------------------------------------


async def test_a_bad_record_is_lost_alone_and_later_rows_land(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    async with AnalyticsStore(str(path)) as store:
        store.record(make_record(1))
        store.record(make_record(2, model={"bad": "type"}))
        store.record(make_record(3))
        await store.flush()
        store.record(make_record(4))
        await store.flush()
        assert store.num_write_errors == 1
        assert store.num_lost == 1
    assert [r.request_id for r in read_records(path)] == ["req-1", "req-3", "req-4"]


async def test_a_failed_batch_does_not_kill_the_writer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "a.db"
    caplog.set_level(logging.WARNING, logger="kvern.analytics.store")
    async with AnalyticsStore(str(path)) as store:
        store.record(make_record(1))
        await store.flush()
        with closing(sqlite3.connect(path)) as other:
            # Every table, so that re-running the migrations below recreates them.
            tables = other.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            for (table,) in tables.fetchall():
                other.execute(f"DROP TABLE {table}")
        for i in (2, 3):  # two failed batches of the same kind
            store.record(make_record(i))
            await store.flush()
        assert store.num_write_errors == 2
        assert store.num_lost == 2
        assert len([r for r in caplog.records if "no such table" in r.getMessage()]) == 1
        with closing(sqlite3.connect(path)) as other:
            for script in MIGRATIONS:
                other.executescript(script)
        store.record(make_record(4))
        await store.flush()
        assert store.num_written == 2
    assert [r.request_id for r in read_records(path)] == ["req-4"]


# -- retention -------------------------------------------------------------


async def test_retention_prunes_old_rows_at_start(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    async with AnalyticsStore(str(path), retention_days=None) as store:
        store.record(make_record(1, ts_s=NOW_S - 3 * DAY_S))
        store.record(make_record(2, ts_s=NOW_S - 1 * DAY_S))
    async with AnalyticsStore(str(path), retention_days=2, clock=lambda: NOW_S) as store:
        assert store.num_pruned == 1
    assert [r.request_id for r in read_records(path)] == ["req-2"]


async def test_retention_prunes_from_the_writer_at_most_hourly(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    now = [NOW_S]
    async with AnalyticsStore(str(path), retention_days=1, clock=lambda: now[0]) as store:
        store.record(make_record(1, ts_s=NOW_S - DAY_S + 60))  # expires in a minute
        await store.flush()
        now[0] = NOW_S + 120  # req-1 is too old, but the start-up prune was 2 min ago
        store.record(make_record(2, ts_s=now[0]))
        await store.flush()
        assert count_rows(path) == 2
        now[0] = NOW_S + 3600  # an hour since the last prune: the next batch prunes
        store.record(make_record(3, ts_s=now[0]))
        await store.flush()
        assert store.num_pruned == 1
    assert [r.request_id for r in read_records(path)] == ["req-2", "req-3"]


# -- migrations ------------------------------------------------------------


async def test_fresh_database_gets_every_migration(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    async with AnalyticsStore(str(path)):
        pass
    assert file_user_version(path) == SCHEMA_VERSION == len(MIGRATIONS)
    with closing(sqlite3.connect(path)) as conn:
        columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(requests)"))
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(requests)")}
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert columns == COLUMNS
    assert indexes == {
        "requests_ts",
        "requests_end_user_ts",
        "requests_diverge_site",
        "requests_model_ts",
        "requests_tenant_ts",
        "requests_upstream_ts",
    }
    assert journal == "wal"


async def test_reopening_is_idempotent_and_keeps_rows(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    for i in range(3):
        async with AnalyticsStore(str(path), retention_days=None) as store:
            store.record(make_record(i))
    assert file_user_version(path) == len(MIGRATIONS)
    assert count_rows(path) == 3


async def test_database_from_the_future_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    store = AnalyticsStore(str(path))
    with pytest.raises(SchemaTooNewError, match="upgrade kvern"):
        await store.start()


async def test_a_later_migration_applies_on_top(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    async with AnalyticsStore(str(path)):
        pass
    later = (*MIGRATIONS, "ALTER TABLE requests ADD COLUMN routed_to TEXT;")
    async with aiosqlite.connect(path) as conn:
        assert await migrate(conn, later) == len(MIGRATIONS) + 1
        assert await migrate(conn, later) == len(MIGRATIONS) + 1  # nothing left to do
        columns = [row[1] for row in await conn.execute_fetchall("PRAGMA table_info(requests)")]
    assert columns[-1] == "routed_to"


async def test_a_failing_migration_leaves_the_previous_version(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    broken = (*MIGRATIONS, "CREATE TABLE routes (x INTEGER); INSERT INTO nowhere VALUES (1);")
    async with aiosqlite.connect(path) as conn:
        with pytest.raises(sqlite3.OperationalError, match="nowhere"):
            await migrate(conn, broken)
        tables = {row[0] for row in await conn.execute_fetchall("SELECT name FROM sqlite_master")}
    assert file_user_version(path) == len(MIGRATIONS)
    assert "routes" not in tables
    assert "requests" in tables


async def test_flush_before_start_returns(tmp_path: Path) -> None:
    store = AnalyticsStore(str(tmp_path / "a.db"))
    await store.flush()
    store.record(make_record(1))
    await store.start()
    await store.flush()
    assert store.num_written == 1
    await store.close()


async def test_an_integer_beyond_sqlite_is_lost_alone_and_its_batch_lands(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    async with AnalyticsStore(str(path)) as store:
        store.record(make_record(1))
        store.record(make_record(2, completion_tokens=2**63))
        store.record(make_record(3))
        await store.flush()
        assert store.num_lost == 1
    assert [r.request_id for r in read_records(path)] == ["req-1", "req-3"]


async def test_a_lone_surrogate_in_a_string_is_stored_replaced(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    async with AnalyticsStore(str(path)) as store:
        store.record(make_record(1, finish_reason="stop\ud800"))
        store.record(make_record(2))
        await store.flush()
        assert store.num_lost == 0
    records = read_records(path)
    assert [r.request_id for r in records] == ["req-1", "req-2"]
    assert records[0].finish_reason == "stop\ufffd\ufffd\ufffd"
