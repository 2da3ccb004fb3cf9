"""The /analytics query layer: exact figures on a hand-built set of rows."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kvern.analytics import AnalyticsStore, RequestRecord, breakdown, summary, timeseries

NOW_S = 1_000_000.0
HOUR_S = 3600.0
DAY_S = 86_400.0


def make_record(request_id: str, ts_s: float, **overrides: Any) -> RequestRecord:
    fields: dict[str, Any] = {
        "request_id": request_id,
        "ts_s": ts_s,
        "model": "a",
        "endpoint": "chat",
        "upstream": "u1",
        "stream": False,
        "status": 200,
    }
    fields.update(overrides)
    return RequestRecord(**fields)


# The hand-built set. Within the last hour (r1..r5, r8):
#   r1, r2 hits; r3 miss; r4 a miss that failed (500); r5 failed before counting
#   (hit None); r8 counted nothing but got a backend cache report.
ROWS = [
    make_record(
        "r1", NOW_S - 10, tenant="t1", hit=True, prompt_tokens=100, matched_tokens=80,
        matched_tokens_aligned=64, ttfb_ms=10, latency_ms=100, reported_cached_tokens=64,
        upstream_prompt_tokens=100, completion_tokens=5, tokenizer_kind="exact",
        predicted_cached_tokens=64,
    ),
    make_record(
        "r2", NOW_S - 20, tenant="t1", hit=True, prompt_tokens=200, matched_tokens=150,
        matched_tokens_aligned=144, ttfb_ms=20, latency_ms=200, reported_cached_tokens=128,
        upstream_prompt_tokens=200, completion_tokens=7, tokenizer_kind="exact",
        predicted_cached_tokens=128,
    ),
    make_record(
        "r3", NOW_S - 30, tenant="t2", upstream="u2", hit=False, prompt_tokens=50,
        matched_tokens=10, matched_tokens_aligned=0, ttfb_ms=30, latency_ms=300,
        completion_tokens=3, tokenizer_kind="fallback", predicted_cached_tokens=0,
    ),
    make_record(
        "r4", NOW_S - 40, model="b", upstream="u2", status=500, hit=False, prompt_tokens=150,
        matched_tokens=0, matched_tokens_aligned=0, ttfb_ms=40, latency_ms=400,
        completion_tokens=0, tokenizer_kind="exact",
    ),
    make_record(
        "r5", NOW_S - 50, model="b", status=None, error="upstream_unreachable", latency_ms=5,
    ),
    make_record(
        "r8", NOW_S - 60, model="b", upstream="u2", reported_cached_tokens=32, ttfb_ms=15,
        latency_ms=150,
    ),
    # Two hours old: in 24h, not in 1h.
    make_record(
        "r6", NOW_S - 2 * HOUR_S, tenant="t1", hit=True, prompt_tokens=1000, matched_tokens=900,
        matched_tokens_aligned=896, ttfb_ms=5, latency_ms=50, tokenizer_kind="exact",
    ),
    # Three days old: in 7d only.
    make_record(
        "r7", NOW_S - 3 * DAY_S, tenant="t1", hit=False, prompt_tokens=10, matched_tokens=0,
        matched_tokens_aligned=0, ttfb_ms=70, latency_ms=700,
    ),
    # Ten days old: in "all" only.
    make_record("r9", NOW_S - 10 * DAY_S, model="c"),
]  # fmt: skip


async def open_store(path: Path, records: list[RequestRecord]) -> AnalyticsStore:
    store = AnalyticsStore(str(path), retention_days=None)
    await store.start()
    for rec in records:
        assert store.record(rec)
    await store.flush()
    return store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[AnalyticsStore]:
    opened = await open_store(tmp_path / "a.db", ROWS)
    yield opened
    await opened.close()


@pytest.fixture
async def empty_store(tmp_path: Path) -> AsyncIterator[AnalyticsStore]:
    opened = await open_store(tmp_path / "empty.db", [])
    yield opened
    await opened.close()


def pcts(p50: float | None, p90: float | None, p99: float | None) -> dict[str, float | None]:
    return {"p50": p50, "p90": p90, "p99": p99}


async def test_summary_of_the_last_hour_has_exact_figures(store: AnalyticsStore) -> None:
    s = await summary(store, window="1h", now_s=NOW_S)
    assert s["window"] == "1h"
    assert s["since_s"] == NOW_S - HOUR_S
    assert s["requests"] == 6
    assert s["errors"] == 2  # r4 (status 500) and r5 (kvern error)
    assert (s["hits"], s["misses"]) == (2, 2)
    assert s["hit_rate"] == 0.5  # r5 and r8 counted nothing: in neither
    assert s["prompt_tokens"] == 500
    assert s["matched_tokens"] == 240
    assert s["matched_tokens_aligned"] == 208
    assert s["token_reuse_ratio"] == pytest.approx(240 / 500)
    assert s["aligned_reuse_ratio"] == pytest.approx(208 / 500)
    assert s["completion_tokens"] == 15
    assert s["tokenizer_kinds"] == {"exact": 3, "fallback": 1}


async def test_predicted_vs_reported_covers_rows_with_both(store: AnalyticsStore) -> None:
    s = await summary(store, window="1h", now_s=NOW_S)
    # r1 and r2; r8 reported but kvern predicted nothing, so it is left out;
    # r3 was predicted but its backend reported nothing: unreported, not 0.
    assert s["predicted_vs_reported"] == {
        "requests_with_report": 2,
        "unreported_requests": 1,
        "predicted_cached_tokens": 64 + 128,  # the cache model's, not the trie's
        "reported_cached_tokens": 64 + 128,
        "upstream_prompt_tokens": 300,
        "reported_to_predicted_ratio": pytest.approx(1.0),
        "seen_prefix_tokens": 64 + 144,  # any earlier prefix kvern saw, whole blocks
    }


async def test_figures_from_the_approximate_tokenizer_say_so(store: AnalyticsStore) -> None:
    s = await summary(store, window="1h", now_s=NOW_S)
    assert s["approximate_requests"] == 1 and s["approximate"] is True
    rows = {r["tenant"]: r for r in await breakdown(store, by="tenant", window="1h", now_s=NOW_S)}
    assert rows["t2"]["approximate"] is True and rows["t1"]["approximate"] is False


async def test_latency_percentiles_split_by_hit_and_skip_failures(store: AnalyticsStore) -> None:
    s = await summary(store, window="1h", now_s=NOW_S)
    # Not failed: r1 (hit), r2 (hit), r3 (miss), r8 (neither).
    assert s["latency_ms"] == {
        "all": pcts(150.0, 300.0, 300.0),  # [100, 150, 200, 300]: ranks 2, 4, 4
        "hit": pcts(100.0, 200.0, 200.0),  # [100, 200]: ranks 1, 2, 2
        "miss": pcts(300.0, 300.0, 300.0),
    }
    assert s["ttfb_ms"] == {
        "all": pcts(15.0, 30.0, 30.0),
        "hit": pcts(10.0, 20.0, 20.0),
        "miss": pcts(30.0, 30.0, 30.0),
    }


async def test_percentiles_are_nearest_rank(tmp_path: Path) -> None:
    records = [
        make_record(f"h{i}", NOW_S - i, hit=True, latency_ms=float(i), ttfb_ms=float(i))
        for i in range(1, 11)
    ] + [
        make_record(f"m{i}", NOW_S - i, hit=False, latency_ms=float(100 + i), ttfb_ms=1.0)
        for i in range(1, 21)
    ]
    store = await open_store(tmp_path / "a.db", records)
    try:
        s = await summary(store, window="1h", now_s=NOW_S)
    finally:
        await store.close()
    assert s["latency_ms"] == {
        "hit": pcts(5.0, 9.0, 10.0),  # n=10: ranks 5, 9, ceil(9.9)=10
        "miss": pcts(110.0, 118.0, 120.0),  # n=20: ranks 10, 18, ceil(19.8)=20
        "all": pcts(105.0, 117.0, 120.0),  # n=30: ranks 15, 27, ceil(29.7)=30
    }


async def test_windows_filter_by_the_injected_now(store: AnalyticsStore) -> None:
    counts = {
        window: (await summary(store, window=window, now_s=NOW_S))["requests"]
        for window in ("1h", "24h", "7d", "all")
    }
    assert counts == {"1h": 6, "24h": 7, "7d": 8, "all": 9}
    # A later "now" moves the window along: two hours on, the last hour is empty.
    later = await summary(store, window="1h", now_s=NOW_S + 2 * HOUR_S)
    assert later["requests"] == 0


async def test_model_filter(store: AnalyticsStore) -> None:
    s = await summary(store, window="1h", model="a", now_s=NOW_S)
    assert (s["requests"], s["hits"], s["misses"], s["errors"]) == (3, 2, 1, 0)
    assert s["model"] == "a"


async def test_empty_database_gives_zeros_and_none(empty_store: AnalyticsStore) -> None:
    s = await summary(empty_store, window="all", now_s=NOW_S)
    assert s["requests"] == s["hits"] == s["prompt_tokens"] == s["errors"] == 0
    assert s["hit_rate"] is None
    assert s["token_reuse_ratio"] is None
    assert s["aligned_reuse_ratio"] is None
    assert s["predicted_vs_reported"]["reported_to_predicted_ratio"] is None
    assert s["latency_ms"]["all"] == pcts(None, None, None)
    assert s["tokenizer_kinds"] == {}
    assert await breakdown(empty_store, by="model", window="all", now_s=NOW_S) == []
    assert await timeseries(empty_store, window="all", bucket_s=60, now_s=NOW_S) == []


async def test_unknown_window_is_a_value_error(store: AnalyticsStore) -> None:
    with pytest.raises(ValueError, match="1h, 24h, 7d, all"):
        await summary(store, window="2h", now_s=NOW_S)
    with pytest.raises(ValueError, match="window"):
        await timeseries(store, window="forever", bucket_s=60, now_s=NOW_S)


async def test_breakdown_by_tenant_is_ordered_by_requests(store: AnalyticsStore) -> None:
    rows = await breakdown(store, by="tenant", window="1h", now_s=NOW_S)
    assert [(r["tenant"], r["requests"]) for r in rows] == [(None, 3), ("t1", 2), ("t2", 1)]
    t1 = rows[1]
    assert (t1["hits"], t1["hit_rate"], t1["prompt_tokens"], t1["matched_tokens"]) == (
        2,
        1.0,
        300,
        230,
    )
    assert t1["latency_ms"]["hit"] == pcts(100.0, 200.0, 200.0)
    assert t1["latency_ms"]["miss"] == pcts(None, None, None)


async def test_breakdown_ties_are_ordered_by_key(store: AnalyticsStore) -> None:
    by_model = await breakdown(store, by="model", window="1h", now_s=NOW_S)
    assert [(r["model"], r["requests"]) for r in by_model] == [("a", 3), ("b", 3)]
    by_model_day = await breakdown(store, by="model", window="24h", now_s=NOW_S)
    assert [(r["model"], r["requests"]) for r in by_model_day] == [("a", 4), ("b", 3)]
    by_upstream = await breakdown(store, by="upstream", window="1h", now_s=NOW_S, model="b")
    assert [(r["upstream"], r["requests"]) for r in by_upstream] == [("u2", 2), ("u1", 1)]


async def test_breakdown_rejects_unknown_dimension(store: AnalyticsStore) -> None:
    with pytest.raises(ValueError, match="model, tenant, end_user, upstream"):
        await breakdown(store, by="colour", window="1h", now_s=NOW_S)  # type: ignore[arg-type]


async def test_timeseries_buckets(store: AnalyticsStore) -> None:
    series = await timeseries(store, window="1h", bucket_s=60, now_s=NOW_S)
    # NOW_S - 10 .. - 40 fall in [999960, 1000020); NOW_S - 50, - 60 in [999900, 999960).
    assert [p["bucket_start_s"] for p in series] == [999_900, 999_960]
    early, late = series
    assert (early["requests"], early["hit_rate"], early["errors"]) == (2, None, 1)
    assert early["latency_ms_p50"] == 150.0  # r8 only; r5 failed
    assert late["requests"] == 4
    assert late["hit_rate"] == 0.5
    assert (late["prompt_tokens"], late["matched_tokens"]) == (500, 240)
    assert late["token_reuse_ratio"] == pytest.approx(0.48)
    assert late["latency_ms_p50"] == 200.0  # [100, 200, 300]; r4 failed
    assert late["ttfb_ms_p50"] == 20.0


async def test_timeseries_rejects_a_bad_bucket(store: AnalyticsStore) -> None:
    with pytest.raises(ValueError, match="bucket_s"):
        await timeseries(store, window="1h", bucket_s=0, now_s=NOW_S)
