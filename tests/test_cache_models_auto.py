"""``cache_model.kind: auto``: kvern sizes its model of each backend's cache from what it says.

Parsing is checked on the answers real servers give (vLLM's Prometheus text,
llama-server's ``/props``, SGLang's ``/get_server_info``); the whole path on a
real llama-server with two slots and no cache settings in the config, on a
scripted server that restarts with another block size, and on an Ollama-like
one that reports no cached tokens.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from kvern.app import create_app
from kvern.cache_models.auto import detected_config, resolve_cache_model
from kvern.config import CacheModelConfig, KvernConfig, parse_config
from kvern.upstream.discovery import (
    BackendFacts,
    parse_llamacpp_props,
    parse_sglang_info,
    parse_vllm_metrics,
)
from tests.llama_server import llama_server, tiny_model
from tests.raw_upstream import CHAT
from tests.servers import free_port, kvern_process, serve
from tests.test_truth_llamacpp import MODEL, run_conversation
from tests.truth import flush, rows

VLLM_METRICS = """\
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="128",cache_dtype="auto",calculate_kv_scales="False",\
enable_prefix_caching="True",gpu_memory_utilization="0.9",num_cpu_blocks="None",\
num_gpu_blocks="455",prefix_caching_hash_algo="sha256"} 1.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
vllm:num_requests_running{engine="0",model_name="m"} 0.0
"""


def test_vllm_metrics_give_block_size_capacity_and_prefix_caching() -> None:
    facts = parse_vllm_metrics(VLLM_METRICS)
    assert facts is not None
    assert (facts.kind, facts.block_size, facts.capacity_tokens) == ("vllm", 128, 128 * 455)
    assert facts.prefix_caching is True
    assert parse_vllm_metrics("# just some other exporter\nup 1\n") is None


def test_llamacpp_props_and_sglang_info_are_read() -> None:
    props = {"default_generation_settings": {"n_ctx": 4096}, "total_slots": 2, "model_path": "m"}
    facts = parse_llamacpp_props(props)
    assert facts is not None and (facts.kind, facts.slots, facts.context_tokens) == (
        "llamacpp",
        2,
        4096,
    )
    info = parse_sglang_info({"page_size": 1, "max_total_num_tokens": 500_000})
    assert info is not None and (info.kind, info.block_size, info.capacity_tokens) == (
        "sglang",
        1,
        500_000,
    )
    assert parse_llamacpp_props({"object": "list"}) is None


def test_explicit_settings_win_over_what_the_upstream_says() -> None:
    vllm = BackendFacts(kind="vllm", block_size=128, capacity_tokens=58_240)
    llama = BackendFacts(kind="llamacpp", block_size=1, slots=4)
    auto = CacheModelConfig()
    assert resolve_cache_model(auto, vllm).kind == "radix"
    assert resolve_cache_model(auto, vllm).block_size == 128
    assert resolve_cache_model(CacheModelConfig(block_size=32), vllm).block_size == 32
    assert resolve_cache_model(auto, llama).kind == "llamacpp"
    assert resolve_cache_model(auto, llama).slots == 4
    assert resolve_cache_model(CacheModelConfig(kind="llamacpp", slots=1), llama).slots == 1
    nothing = resolve_cache_model(auto, BackendFacts())
    assert (nothing.kind, nothing.block_size) == ("radix", None)  # trie.block_size then


def test_routed_upstreams_take_unset_block_size_and_capacity() -> None:
    config = parse_config(
        {
            "upstreams": [
                {"name": "a", "url": "http://127.0.0.1:1/v1"},
                {"name": "b", "url": "http://127.0.0.1:2/v1", "kv_capacity_tokens": 1000},
            ]
        }
    )
    vllm = BackendFacts(kind="vllm", block_size=32, capacity_tokens=64_000)
    effective = detected_config(config, {"a": vllm, "b": vllm})
    a, b = effective.upstreams
    assert (a.block_size, a.kv_capacity_tokens) == (32, 64_000)
    assert (b.block_size, b.kv_capacity_tokens) == (32, 1000)  # set in the config: kept


@pytest.fixture(scope="module")
def two_slots() -> Iterator[str]:
    with llama_server(tiny_model("qwen2"), slots=2) as url:
        yield url


def test_with_no_cache_settings_kvern_models_a_real_two_slot_llama_server_exactly(
    tmp_path: Path, two_slots: str, tokenizer_fixtures: dict[str, Any]
) -> None:
    config = parse_config(
        {
            "upstream": {"base_url": two_slots + "/v1"},  # no cache_model at all
            "tokenizers": {"models": {MODEL: str(tokenizer_fixtures["qwen2"].directory)}},
            "trie": {"block_size": 1, "min_prefix_tokens": 1},
            "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 10},
        }
    )
    with serve(create_app(config)) as kvern:
        run_conversation(kvern, 3, own_replies=False)
        flush(kvern)
        health = httpx.get(kvern + "/health", timeout=30).json()
    (said,) = health["backends"].values()
    assert said["kind"] == "llamacpp" and said["slots"] == 2
    assert "cache model llamacpp slots 2" in said["summary"]
    recorded = rows(tmp_path / "kvern.db")
    assert {r["backend_model"] for r in recorded} == {"llamacpp"}
    assert [r["predicted_cached_tokens"] for r in recorded] == [
        r["reported_cached_tokens"] for r in recorded
    ]


def test_kvern_serve_with_a_config_file_and_env_overrides_still_detects_the_upstream(
    tmp_path: Path, two_slots: str, tokenizer_fixtures: dict[str, Any]
) -> None:
    """As users run it: the file, then KVERN_* and the flags, and what is unset stays auto."""
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "tokenizers": {"models": {MODEL: str(tokenizer_fixtures["qwen2"].directory)}},
                "analytics": {"db_path": str(tmp_path / "kvern.db")},
            }
        )
    )
    env = {"KVERN_UPSTREAM_URL": two_slots + "/v1", "KVERN_HOST": "127.0.0.1"}
    args = ["-m", "kvern", "serve", "--config", str(path), "--host", "127.0.0.1"]
    with kvern_process(args, cwd=tmp_path, env=env) as (_, kvern):
        health = httpx.get(kvern + "/health", timeout=30).json()
    (said,) = health["backends"].values()
    assert said["kind"] == "llamacpp" and said["slots"] == 2
    assert "cache model llamacpp slots 2" in said["summary"]


def zero_config(up: str, tmp_path: Path, tokenizer_fixtures: dict[str, Any]) -> KvernConfig:
    """kvern before ``up`` with no cache settings at all: what it runs, it asked for."""
    return parse_config(
        {
            "upstream": {"base_url": up + "/v1"},
            "tokenizers": {
                "models": {"*": str(tokenizer_fixtures["qwen2"].directory)},
                "parity_check": False,
            },
            "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 10},
        }
    )


def scripted(state: dict[str, Any]) -> Starlette:
    """A vLLM-like server whose block size and health the test changes as it goes."""

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(VLLM_METRICS.replace('"128"', f'"{state["block"]}"'))

    async def chat(request: Request) -> Response:
        await request.body()
        if state["down"]:
            return JSONResponse({"error": "restarting"}, status_code=503)
        return JSONResponse(CHAT)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "sim"}]})

    return Starlette(
        routes=[
            Route("/metrics", metrics),
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ]
    )


def block_sizes(db: Path) -> list[int | None]:
    con = sqlite3.connect(db)
    try:
        query = "SELECT block_size FROM requests WHERE status = 200 ORDER BY rowid"
        return [r[0] for r in con.execute(query)]
    finally:
        con.close()


def test_an_upstream_back_with_another_block_size_is_modelled_with_it(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    state = {"block": 16, "down": False}
    body = {"model": "sim", "messages": [{"role": "user", "content": "hello " * 40}]}
    with serve(scripted(state)) as up:
        with serve(create_app(zero_config(up, tmp_path, tokenizer_fixtures))) as kvern:
            post = lambda: httpx.post(kvern + "/v1/chat/completions", json=body, timeout=30)  # noqa: E731
            assert post().status_code == 200
            flush(kvern)  # tracked (its tokenizer loaded) before the restart
            state.update(block=32, down=True)  # it restarts with another block size
            assert [post().status_code for _ in range(3)] == [503] * 3
            state["down"] = False
            assert post().status_code == 200  # back: kvern asks again
            flush(kvern)
            said = httpx.get(kvern + "/health", timeout=30).json()["backends"]
            assert post().status_code == 200
            flush(kvern)
    assert next(iter(said.values()))["block_size"] == 32
    assert block_sizes(tmp_path / "kvern.db")[0] == 16
    assert block_sizes(tmp_path / "kvern.db")[-1] == 32


def test_an_upstream_started_after_kvern_is_asked_once_it_answers(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    """kvern first, then its backend (the README's two commands run at once)."""
    state = {"block": 16, "down": False}
    port = free_port()
    body = {"model": "sim", "messages": [{"role": "user", "content": "hello " * 40}]}
    up = f"http://127.0.0.1:{port}"
    with serve(create_app(zero_config(up, tmp_path, tokenizer_fixtures))) as kvern:
        health = lambda: httpx.get(kvern + "/health", timeout=30).json()["backends"]  # noqa: E731
        assert next(iter(health().values()))["kind"] == "unknown"
        with serve(scripted(state), port=port):
            post = httpx.post(kvern + "/v1/chat/completions", json=body, timeout=30)
            assert post.status_code == 200
            deadline = time.monotonic() + 10
            while (said := next(iter(health().values())))["kind"] != "vllm":
                assert time.monotonic() < deadline, said
                time.sleep(0.05)
    assert said["block_size"] == 16 and "-> cache model radix block 16" in said["summary"]


def test_an_upstream_that_reports_no_cached_tokens_is_named_and_counted_unreported(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    async def version(request: Request) -> Response:
        return JSONResponse({"version": "0.12.0"})

    async def chat(request: Request) -> Response:
        await request.body()
        return JSONResponse(CHAT)  # no prompt_tokens_details, as Ollama's OpenAI API

    app = Starlette(
        routes=[
            Route("/api/version", version),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ]
    )
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi there"}]}
    with serve(app) as up:
        with serve(create_app(zero_config(up, tmp_path, tokenizer_fixtures))) as kvern:
            for _ in range(2):
                assert httpx.post(kvern + "/v1/chat/completions", json=body).status_code == 200
            report = httpx.get(kvern + "/analytics", params={"wait_s": 30}, timeout=60).json()
            said = httpx.get(kvern + "/health", timeout=30).json()["backends"]
    facts = next(iter(said.values()))
    assert facts["kind"] == "ollama" and facts["reports_cached_tokens"] is False
    assert "reports no cached tokens" in facts["summary"]
    figures = report["summary"]["predicted_vs_reported"]
    assert figures["unreported_requests"] == 2 and figures["requests_with_report"] == 0
