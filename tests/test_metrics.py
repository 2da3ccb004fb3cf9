"""``GET /metrics``: exact series after a known trace, across the relay and the brain.

The trace runs through the official openai client -> kvern -> a real
llama-server (one slot, so its reuse is exact and reported); kvern's brain is
its own process, as in production, so the trie, tokenizer and phase series
are the brain's, sent to the relay at scrape time.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvern.app import create_app
from kvern.config import KvernConfig, parse_config
from tests.llama_server import llama_server, tiny_model
from tests.servers import chat_answer, free_port, serve, serve_chat
from tests.truth import chat, client_for, flush, rows, stream_chat

MODEL = "tiny-qwen2"
SYSTEM = "You are the metrics test's assistant. Answer briefly and plainly. " * 6

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, **headers: str) -> Samples:
    """Every sample of one scrape: (name, labels) -> value; the text must parse."""
    response = httpx.get(url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"sample {key} twice in one scrape"
            out[key] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def config_for(tmp_path: Path, url: str, fixtures: dict[str, Any], **extra: Any) -> KvernConfig:
    data: dict[str, Any] = {
        "upstream": {"base_url": url + "/v1", "cache_model": {"kind": "llamacpp"}},
        "tokenizers": {"models": {MODEL: str(fixtures["qwen2"].directory)}},
        "trie": {"block_size": 1, "min_prefix_tokens": 1},
        "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 10},
    }
    data.update(extra)
    return parse_config(data)


@pytest.fixture(scope="module")
def one_slot() -> Iterator[str]:
    with llama_server(tiny_model("qwen2"), slots=1) as url:
        yield url


def run_trace(kvern: str) -> int:
    """Two conversations sharing a system prompt, one turn streamed; returns the requests sent."""
    client = client_for(kvern)
    sent = 0
    for name in ("ada", "bob"):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": name}]
        for turn in range(3):
            if turn == 1:
                stream_chat(client, MODEL, messages)
            else:
                chat(client, MODEL, messages)
            sent += 1
            messages += [
                {"role": "assistant", "content": f"Answer {turn} for {name}."},
                {"role": "user", "content": f"And turn {turn}?"},
            ]
    return sent


def test_metrics_after_a_known_trace_equal_the_analytics_of_the_same_trace(
    tmp_path: Path, one_slot: str, tokenizer_fixtures: dict[str, Any]
) -> None:
    config = config_for(tmp_path, one_slot, tokenizer_fixtures)
    assert config.tracking.isolation == "process"  # the brain's series cross a process
    with serve(create_app(config)) as kvern:
        sent = run_trace(kvern)
        flush(kvern)
        analytics = httpx.get(kvern + "/analytics", params={"window": "all"}, timeout=30).json()
        m = scrape(kvern)
    table = rows(tmp_path / "kvern.db")
    assert len(table) == sent == 6
    summary = analytics["summary"]
    upstream = table[0]["upstream"]
    labels = {"model": MODEL, "upstream": upstream}

    # Requests, by the same rows /analytics counts.
    assert total(m, "kvern_requests_total") == summary["requests"] == 6
    assert total(m, "kvern_requests_total", endpoint="chat", status_class="2xx", **labels) == 6
    assert total(m, "kvern_request_errors_total") == summary["errors"] == 0
    # Tokens: kvern's count, the trie's match, hits and misses.
    assert total(m, "kvern_prompt_tokens_total", **labels) == summary["prompt_tokens"]
    assert summary["prompt_tokens"] == sum(r["prompt_tokens"] for r in table)
    assert total(m, "kvern_matched_tokens_total", **labels) == summary["matched_tokens"]
    assert total(m, "kvern_prefix_lookups_total", outcome="hit") == summary["hits"]
    assert total(m, "kvern_prefix_lookups_total", outcome="miss") == summary["misses"]
    assert summary["hits"] == 5  # the second conversation shares the system prompt
    # Predicted against reported: every request of a one-slot llama-server is exact.
    pvr = summary["predicted_vs_reported"]
    assert total(m, "kvern_calibration_predicted_tokens_total") == pvr["predicted_cached_tokens"]
    assert total(m, "kvern_calibration_reported_tokens_total") == pvr["reported_cached_tokens"]
    assert total(m, "kvern_predicted_cached_tokens_total") == sum(
        r["predicted_cached_tokens"] for r in table
    )
    assert total(m, "kvern_reported_cached_tokens_total") == sum(
        r["reported_cached_tokens"] for r in table
    )
    exact = sum(r["predicted_cached_tokens"] == r["reported_cached_tokens"] for r in table)
    assert total(m, "kvern_predictions_total", outcome="exact") == exact == 6
    assert total(m, "kvern_predictions_total", outcome="unreported") == 0
    assert total(m, "kvern_prediction_error_tokens_bucket", le="0.0") == 6
    assert total(m, "kvern_prefix_match_ratio_count", model=MODEL) == 6
    # Latency histograms hold every request that did not fail, split hit / miss.
    assert total(m, "kvern_time_to_first_byte_seconds_count") == 6
    assert total(m, "kvern_time_to_first_byte_seconds_count", outcome="hit") == 5
    assert total(m, "kvern_request_duration_seconds_count", outcome="miss") == 1
    # kvern's own time: the relay's phases and the brain's, in one family.
    for phase in ("parse", "route", "total", "render", "tokenize", "trie"):
        assert total(m, "kvern_added_seconds_count", phase=phase) == 6, phase
    # The brain's state: its trie, tokenizer and queue.
    assert total(m, "kvern_brain_up") == 1
    assert total(m, "kvern_trie_insertions_total", model=MODEL) == 6
    assert total(m, "kvern_trie_tokens", model=MODEL) > 0
    assert total(m, "kvern_trie_evictions_total", model=MODEL, policy="lru") == 0
    assert total(m, "kvern_tokenizer_exact", model=MODEL) == 1
    assert total(m, "kvern_tracking_tracked_total") == 6
    assert total(m, "kvern_tracking_backlog") == 0
    # The relay's live state and the store.
    assert total(m, "kvern_upstream_healthy", upstream=upstream) == 1
    assert total(m, "kvern_upstream_circuit_state", upstream=upstream, state="closed") == 1
    assert total(m, "kvern_upstream_in_flight_requests", upstream=upstream) == 0
    assert total(m, "kvern_analytics_written_total") == analytics["store"]["written"] == 6
    assert total(m, "kvern_analytics_dropped_total") == 0
    assert total(m, "kvern_build_info") == 1


# -- scripted upstreams: errors, bounds, the admin key, a brain that is gone --


def _scripted_config(
    tmp_path: Path, url: str, fixtures: dict[str, Any], **extra: Any
) -> KvernConfig:
    data: dict[str, Any] = {
        "upstream": {"base_url": url + "/v1", "cache_model": {"kind": "radix", "block_size": 16}},
        "tokenizers": {"models": {"*": str(fixtures["qwen2"].directory)}, "parity_check": False},
        "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 10},
        "tracking": {"isolation": "thread"},
    }
    data.update(extra)
    return parse_config(data)


def _post(url: str, model: str, **headers: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=30)


def test_model_names_past_the_bound_are_counted_under_other_not_as_new_series(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    with serve_chat(chat_answer, "m") as upstream:
        config = _scripted_config(tmp_path, upstream, tokenizer_fixtures, metrics={"max_models": 3})
        with serve(create_app(config)) as kvern:
            for i in range(8):
                assert _post(kvern, f"invented-{i}").status_code == 200
            flush(kvern)
            m = scrape(kvern)
    models = {dict(ls)["model"] for (n, ls) in m if n == "kvern_requests_total"}
    assert models == {"invented-0", "invented-1", "invented-2", "__other__"}
    assert total(m, "kvern_requests_total") == 8
    assert total(m, "kvern_requests_total", model="__other__") == 5


def test_an_unreachable_upstream_is_counted_as_a_5xx_with_its_error_code(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = _scripted_config(tmp_path, dead, tokenizer_fixtures)
    with serve(create_app(config)) as kvern:
        assert _post(kvern, "m").status_code == 502
        flush(kvern)
        m = scrape(kvern)
    assert total(m, "kvern_requests_total", status_class="5xx") == 1
    assert total(m, "kvern_request_errors_total", reason="upstream_unreachable") == 1
    # A failed request says nothing about latency with or without a cache hit.
    assert total(m, "kvern_time_to_first_byte_seconds_count") == 0
    assert total(m, "kvern_upstream_attempts_total", outcome="failed") == 1


def test_metrics_need_the_admin_key_when_one_is_set(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    key = "metrics-admin-key-0123456789"
    with serve_chat(chat_answer, "m") as upstream:
        config = _scripted_config(
            tmp_path, upstream, tokenizer_fixtures, proxy={"admin_api_key": key}
        )
        with serve(create_app(config)) as kvern:
            refused = httpx.get(kvern + "/metrics", timeout=10)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "admin_key_required"
            m = scrape(kvern, authorization=f"Bearer {key}")
    assert total(m, "kvern_build_info") == 1


def test_per_tenant_series_are_off_by_default_and_capped_when_on(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    with serve_chat(chat_answer, "m") as upstream:
        off = _scripted_config(tmp_path / "off", upstream, tokenizer_fixtures)
        on = _scripted_config(
            tmp_path / "on",
            upstream,
            tokenizer_fixtures,
            metrics={"tenant_series": True, "max_tenants": 2},
        )
        for config, expect in ((off, None), (on, {"__other__"})):
            with serve(create_app(config)) as kvern:
                for i in range(4):
                    assert _post(kvern, "m", authorization=f"Bearer key-{i}").status_code == 200
                flush(kvern)
                m = scrape(kvern)
            tenants = {dict(ls)["tenant"] for (n, ls) in m if n == "kvern_tenant_requests_total"}
            if expect is None:
                assert tenants == set()
            else:
                assert len(tenants) == 3 and expect <= tenants
                assert all(not t.startswith("key-") for t in tenants)  # keyed hashes only
                assert total(m, "kvern_tenant_requests_total") == 4


def test_a_scrape_while_the_brain_is_hung_still_answers_and_says_the_brain_is_down(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    with serve_chat(chat_answer, "m") as upstream:
        config = _scripted_config(
            tmp_path, upstream, tokenizer_fixtures, tracking={"isolation": "process"}
        )
        app = create_app(config)
        with serve(app) as kvern:
            assert _post(kvern, "m").status_code == 200
            flush(kvern)
            pid = app.state.services.tracker.stats.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)  # alive, answering nothing
            try:
                m = scrape(kvern)
                assert _post(kvern, "m").status_code == 200  # requests are unaffected
            finally:
                os.kill(pid, signal.SIGCONT)
    assert total(m, "kvern_brain_up") == 0
    assert total(m, "kvern_requests_total") == 1
    assert not any(n.startswith("kvern_trie_") for (n, _) in m)


def test_openmetrics_is_served_to_a_scraper_that_asks_for_it(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    with serve_chat(chat_answer, "m") as upstream:
        with serve(create_app(_scripted_config(tmp_path, upstream, tokenizer_fixtures))) as kvern:
            response = httpx.get(
                kvern + "/metrics",
                headers={"accept": "application/openmetrics-text; version=1.0.0"},
                timeout=10,
            )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_one_upstreams_load_and_circuit_are_in_health_and_metrics_alike(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    with serve_chat(chat_answer, "m") as upstream:
        with serve(create_app(_scripted_config(tmp_path, upstream, tokenizer_fixtures))) as kvern:
            assert _post(kvern, "m").status_code == 200
            flush(kvern)
            health = httpx.get(kvern + "/health", timeout=30).json()
            m = scrape(kvern)
    one = health["upstream"]
    assert one["circuit"] == "closed"
    assert one["load"] == {"in_flight": 0, "prefill_tokens": 0, "decoding": 0, "tokens": 0}
    name = one["name"]
    assert total(m, "kvern_upstream_circuit_state", upstream=name, state="closed") == 1
    assert total(m, "kvern_upstream_in_flight_requests", upstream=name) == 0
    assert total(m, "kvern_upstream_attempts_total", upstream=name, outcome="ok") == 1
