"""End to end on 127.0.0.1: the official openai client -> kvern -> a vLLM-like upstream."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvern.app import create_app
from kvern.config import KvernConfig, parse_config
from tests.conversations import growing_chat
from tests.fake_vllm import FakeVLLMState, create_fake_vllm
from tests.servers import free_port, serve

QWEN = "qwen2.5:7b"
LLAMA = "llama3.2:3b"


@pytest.fixture(scope="module")
def upstream(hf_tokenizers: dict[str, Any]) -> Iterator[tuple[str, FakeVLLMState]]:
    app, state = create_fake_vllm({QWEN: hf_tokenizers["qwen2"], LLAMA: hf_tokenizers["llama3"]})
    with serve(app) as url:
        yield url, state


def kvern_config(
    tmp_path: Path, upstream_url: str, fixtures: dict[str, Any], **overrides: Any
) -> KvernConfig:
    data: dict[str, Any] = {
        "upstream": {"base_url": upstream_url + "/v1", "read_timeout_s": 5.0},
        "tokenizers": {
            "models": {
                "qwen2.5*": str(fixtures["qwen2"].directory),
                "llama3.2*": str(fixtures["llama3"].directory),
            }
        },
        "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 20},
        "normalization": {
            "qwen2.5:norm": [{"pattern": r"\d{4}-\d{2}-\d{2}", "replacement": "<DATE>"}]
        },
    }
    for key, value in overrides.items():
        data.setdefault(key, {}).update(value)
    return parse_config(data)


@contextmanager
def running_kvern(config: KvernConfig) -> Iterator[str]:
    with serve(create_app(config)) as url:
        yield url


@pytest.fixture
def kvern(
    tmp_path: Path, upstream: tuple[str, FakeVLLMState], tokenizer_fixtures: dict[str, Any]
) -> Iterator[str]:
    with running_kvern(kvern_config(tmp_path, upstream[0], tokenizer_fixtures)) as url:
        yield url


def client_for(url: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="sk-test-key", max_retries=0, **kw)


def analytics(url: str, **params: Any) -> dict[str, Any]:
    query = {"window": "all", "wait_s": 20, **params}
    response = httpx.get(url + "/analytics", params=query, timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_non_streaming_chat_is_indistinguishable_from_direct(
    kvern: str, upstream: tuple[str, FakeVLLMState]
) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    via = client_for(kvern).chat.completions.create(model=QWEN, messages=messages)  # type: ignore[arg-type]
    direct = client_for(upstream[0]).chat.completions.create(model=QWEN, messages=messages)  # type: ignore[arg-type]
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.usage is not None and direct.usage is not None
    assert via.usage.prompt_tokens == direct.usage.prompt_tokens


def test_body_bytes_and_auth_reach_upstream_unchanged(
    kvern: str, upstream: tuple[str, FakeVLLMState]
) -> None:
    state = upstream[1]
    raw = b'{ "model" : "qwen2.5:7b",\n  "messages": [{"role":"user","content":"caf\\u00e9"}] }'
    response = httpx.post(
        kvern + "/v1/chat/completions",
        content=raw,
        headers={"content-type": "application/json", "authorization": "Bearer sk-secret"},
    )
    assert response.status_code == 200
    assert state.raw_bodies[-1] == raw
    seen = state.headers[-1]
    assert seen["authorization"] == "Bearer sk-secret"
    assert seen["host"] == upstream[0].removeprefix("http://")
    assert response.headers["content-type"] == "application/json"


def test_streaming_relays_every_chunk_and_usage(kvern: str) -> None:
    stream = client_for(kvern).chat.completions.create(
        model=QWEN,
        messages=[{"role": "user", "content": "Stream please"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-fake-chunks": "6"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(f"word{i} " for i in range(6))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_multi_turn_figures_are_exact(
    kvern: str, upstream: tuple[str, FakeVLLMState], hf_tokenizers: dict[str, Any]
) -> None:
    tok = hf_tokenizers["qwen2"]
    turns = growing_chat(2, system="You are a meticulous assistant. " * 12)
    client = client_for(kvern)
    for messages in turns:
        client.chat.completions.create(
            model=QWEN,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},  # type: ignore[arg-type]
        ).close()
    lens = [
        len(
            tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
        )
        for m in turns
    ]
    summary = analytics(kvern, model=QWEN)["summary"]
    assert summary["requests"] == 2
    assert summary["prompt_tokens"] == lens[0] + lens[1]
    # Turn 2 reuses exactly turn 1's rendered prompt (generation prompt included).
    assert summary["matched_tokens"] == lens[0]
    assert summary["matched_tokens_aligned"] == lens[0] // 16 * 16
    assert summary["hits"] == 1
    reported = upstream[1].cached[-1]
    assert reported == lens[0] // 16 * 16
    assert summary["predicted_vs_reported"]["reported_cached_tokens"] == reported


def test_normalization_lets_prompts_differing_in_a_date_share_their_prefix(kvern: str) -> None:
    client = client_for(kvern)
    for day in ("2026-11-22", "2026-11-23"):
        for model in ("qwen2.5:norm", "qwen2.5:plain"):
            client.chat.completions.create(
                model=model,
                messages=[
                    {"role": "system", "content": f"Today is {day}. " + "Be precise. " * 30},
                    {"role": "user", "content": "What is new?"},
                ],
            )
    by_model = {row["model"]: row for row in analytics(kvern)["by_model"]}
    normalized, plain = by_model["qwen2.5:norm"], by_model["qwen2.5:plain"]
    assert normalized["matched_tokens"] == normalized["prompt_tokens"] // 2
    # Without the rule only the text before the differing digit is shared.
    assert 0 < plain["matched_tokens"] < plain["prompt_tokens"] // 8


def test_client_disconnect_mid_stream_cancels_upstream(
    kvern: str, upstream: tuple[str, FakeVLLMState]
) -> None:
    state = upstream[1]
    before = state.disconnects
    with httpx.stream(
        "POST",
        kvern + "/v1/chat/completions",
        json={"model": QWEN, "messages": [{"role": "user", "content": "long"}], "stream": True},
        headers={"x-fake-chunks": "200", "x-fake-chunk-delay-ms": "50"},
    ) as response:
        for _ in response.iter_raw():
            break
    deadline = time.monotonic() + 5
    while state.disconnects == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.disconnects == before + 1


def test_upstream_down_is_a_502_naming_it(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with running_kvern(kvern_config(tmp_path, dead, tokenizer_fixtures)) as url:
        with pytest.raises(openai.APIStatusError) as err:
            client_for(url).chat.completions.create(
                model=QWEN, messages=[{"role": "user", "content": "x"}]
            )
        assert err.value.status_code == 502
        body = err.value.body
        assert isinstance(body, dict)
        assert dead.removeprefix("http://") in body["message"]
        assert body["code"] == "upstream_unreachable"
        health = httpx.get(url + "/health").json()
        assert health["status"] == "degraded" and health["upstream"]["reachable"] is False


def test_slow_upstream_is_a_504(
    tmp_path: Path, upstream: tuple[str, FakeVLLMState], tokenizer_fixtures: dict[str, Any]
) -> None:
    config = kvern_config(
        tmp_path, upstream[0], tokenizer_fixtures, upstream={"read_timeout_s": 0.3}
    )
    with running_kvern(config) as url:
        with pytest.raises(openai.APIStatusError) as err:
            client_for(url).chat.completions.create(
                model=QWEN,
                messages=[{"role": "user", "content": "x"}],
                extra_headers={"x-fake-delay-ms": "1500"},
            )
        assert err.value.status_code == 504
        assert "timed out" in str(err.value.body)


def test_upstream_error_status_is_relayed_and_recorded(kvern: str) -> None:
    with pytest.raises(openai.InternalServerError) as err:
        client_for(kvern).chat.completions.create(
            model=QWEN,
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-fake-status": "500"},
        )
    assert err.value.status_code == 500
    assert "injected failure" in str(err.value.body)
    assert analytics(kvern)["summary"]["errors"] == 1


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
    ],
)
def test_bodies_no_backend_accepts_get_openai_shaped_400s_and_are_not_forwarded(
    kvern: str, upstream: tuple[str, FakeVLLMState], body: bytes, needle: str
) -> None:
    before = len(upstream[1].raw_bodies)
    response = httpx.post(
        kvern + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert needle in error["message"]
    assert set(error) >= {"message", "type", "code"}
    assert len(upstream[1].raw_bodies) == before


@pytest.mark.parametrize(
    "body",
    [
        b'{"messages": [{"role": "user", "content": "x"}]}',
        b'{"model": "qwen2.5:7b"}',
        b'{"model": "qwen2.5:7b", "messages": []}',
        b'{"model": "qwen2.5:7b", "messages": ["x"]}',
    ],
)
def test_bodies_a_backend_may_judge_are_forwarded_unchanged_and_get_a_row(
    kvern: str, upstream: tuple[str, FakeVLLMState], body: bytes
) -> None:
    before = len(upstream[1].raw_bodies)
    rows_before = analytics(kvern)["summary"]["requests"]
    response = httpx.post(
        kvern + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["type"] == "BadRequestError"  # the backend's answer, relayed
    assert upstream[1].raw_bodies[before:] == [body]
    assert analytics(kvern)["summary"]["requests"] == rows_before + 1


def test_oversized_body_is_refused(
    tmp_path: Path, upstream: tuple[str, FakeVLLMState], tokenizer_fixtures: dict[str, Any]
) -> None:
    config = kvern_config(tmp_path, upstream[0], tokenizer_fixtures, proxy={"max_body_bytes": 2048})
    with running_kvern(config) as url:
        response = httpx.post(
            url + "/v1/chat/completions",
            json={"model": QWEN, "messages": [{"role": "user", "content": "x" * 5000}]},
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "body_too_large"


def test_models_and_other_paths_pass_through(kvern: str) -> None:
    models = client_for(kvern).models.list()
    assert {m.id for m in models.data} == {QWEN, LLAMA}
    missing = httpx.get(kvern + "/v1/no-such-thing")
    assert missing.status_code == 404


def test_every_row_is_on_disk_after_shutdown(
    tmp_path: Path, upstream: tuple[str, FakeVLLMState], tokenizer_fixtures: dict[str, Any]
) -> None:
    config = kvern_config(tmp_path, upstream[0], tokenizer_fixtures)
    with running_kvern(config) as url:
        client = client_for(url)
        for i in range(25):
            client.chat.completions.create(
                model=QWEN, messages=[{"role": "user", "content": f"n{i}"}], stream=i % 2 == 0
            )
    rows = (
        sqlite3.connect(tmp_path / "kvern.db")
        .execute("SELECT count(*), sum(prompt_tokens IS NOT NULL) FROM requests")
        .fetchone()
    )
    assert rows == (25, 25)


def test_health_and_trie_visualize(kvern: str) -> None:
    client_for(kvern).chat.completions.create(
        model=QWEN, messages=[{"role": "user", "content": "Hot prefix " * 20}]
    )
    client_for(kvern).chat.completions.create(
        model=QWEN, messages=[{"role": "user", "content": "Hot prefix " * 20}]
    )
    trie = httpx.get(kvern + "/trie/visualize", params={"n": 3, "wait_s": 20}, timeout=30).json()
    hot = trie[QWEN]["hot_prefixes"]
    assert hot[0]["count"] == 2 and "Hot prefix" in hot[0]["text"]
    assert QWEN in trie[QWEN]["display"]
    # /trie/visualize waited for tracking, so the tokenizer is loaded now.
    health = httpx.get(kvern + "/health").json()
    assert health["status"] == "ok" and health["upstream"]["reachable"]
    assert health["tokenizers"][QWEN]["kind"] == "exact"
    bad = httpx.get(kvern + "/trie/visualize", params={"model": "nope"})
    assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]


def test_client_leaving_before_the_first_byte_cancels_upstream(
    kvern: str, upstream: tuple[str, FakeVLLMState]
) -> None:
    state = upstream[1]
    # Load the tokenizer first: its load holds the GIL this test process shares.
    client_for(kvern).chat.completions.create(
        model=QWEN, messages=[{"role": "user", "content": "w"}]
    )
    httpx.get(kvern + "/trie/visualize", params={"wait_s": 20}, timeout=30)
    before = len(state.cached)
    disconnects = state.disconnects
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            kvern + "/v1/chat/completions",
            json={"model": QWEN, "messages": [{"role": "user", "content": "slow"}]},
            headers={"x-fake-delay-ms": "1500"},
            timeout=0.3,
        )
    deadline = time.monotonic() + 5
    while state.disconnects == disconnects and time.monotonic() < deadline:
        time.sleep(0.05)
    # The upstream saw the disconnect during its "prefill" and never answered.
    assert state.disconnects == disconnects + 1
    assert len(state.cached) == before
    rows = analytics(kvern)["summary"]
    assert rows["requests"] == 2 and rows["errors"] == 1


def test_ollama_native_chat_is_tracked_with_its_own_cache_figure(
    kvern: str, upstream: tuple[str, FakeVLLMState]
) -> None:
    state = upstream[1]
    turns = growing_chat(2, system="Ollama system prompt. " * 20)
    for messages in turns:
        reply = httpx.post(kvern + "/api/chat", json={"model": QWEN, "messages": messages})
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("application/x-ndjson")
        assert json.loads(reply.text.splitlines()[-1])["done"] is True
    summary = analytics(kvern, model=QWEN)["summary"]
    assert summary["requests"] == 2
    # Ollama reports prompt tokens *evaluated*; kvern derives the cached rest.
    assert summary["predicted_vs_reported"]["reported_cached_tokens"] == state.cached[-1]
    assert summary["matched_tokens"] == state.prompt_tokens[-2]
    tags = httpx.get(kvern + "/api/tags")
    assert tags.status_code == 200 and tags.json()["models"][0]["name"] == QWEN


def test_analytics_parameters(kvern: str) -> None:
    client_for(kvern).chat.completions.create(
        model=QWEN, messages=[{"role": "user", "content": "x"}]
    )
    params = {"window": "1h", "bucket": 60, "wait_s": 20}
    out = httpx.get(kvern + "/analytics", params=params, timeout=30).json()
    assert out["window"] == "1h" and out["summary"]["requests"] == 1
    assert len(out["timeseries"]) == 1 and out["timeseries"][0]["requests"] == 1
    assert out["by_model"][0]["model"] == QWEN
    assert out["by_tenant"][0]["tenant"].startswith("key:")
    assert "sk-test-key" not in json.dumps(out)
    bad = httpx.get(kvern + "/analytics", params={"window": "1y"})
    assert bad.status_code == 400 and "1h, 24h, 7d, all" in bad.json()["error"]["message"]
    bad_bucket = httpx.get(kvern + "/analytics", params={"bucket": 0})
    assert (
        bad_bucket.status_code == 400
        and bad_bucket.json()["error"]["type"] == "invalid_request_error"
    )
