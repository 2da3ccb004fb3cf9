"""``run_proxy.py`` and ``python -m kvern serve`` as a user runs them, in a subprocess."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_vllm import FakeVLLMState, create_fake_vllm
from tests.servers import free_port, kvern_process, serve

ROOT = Path(__file__).resolve().parent.parent


def test_run_proxy_serves_with_the_shipped_config_and_no_upstream(tmp_path: Path) -> None:
    env = {"KVERN_UPSTREAM_URL": f"http://127.0.0.1:{free_port()}/v1"}
    with kvern_process(
        [str(ROOT / "run_proxy.py"), "--config", str(ROOT / "config.yaml")], tmp_path, env
    ) as (proc, url):
        health = httpx.get(url + "/health").json()
        assert health["status"] == "degraded"
        assert health["upstream"]["reachable"] is False
        reply = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "llama3.2:3b", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert reply.status_code == 502
        assert reply.json()["error"]["code"] == "upstream_unreachable"
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises SIGTERM after its graceful shutdown.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert (tmp_path / "kvern.db").exists()


def test_bad_config_fails_at_start_with_the_key_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("trie:\n  block_size: -1\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "kvern", "serve", "--config", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "trie.block_size: got -1" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def upstream(hf_tokenizers: dict[str, Any]) -> Iterator[tuple[str, FakeVLLMState]]:
    app, state = create_fake_vllm({"qwen2.5:7b": hf_tokenizers["qwen2"]})
    with serve(app) as url:
        yield url, state


def test_sigterm_loses_no_analytics_row(
    tmp_path: Path, upstream: tuple[str, FakeVLLMState], tokenizer_fixtures: dict[str, Any]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"upstream:\n  base_url: {upstream[0]}/v1\n"
        f"tokenizers:\n  models:\n    'qwen2.5*': {tokenizer_fixtures['qwen2'].directory}\n"
        "analytics:\n  flush_interval_ms: 5000\n  batch_size: 100000\n",
        encoding="utf-8",
    )
    with kvern_process(["-m", "kvern", "serve", "--config", str(config)], tmp_path) as (proc, url):
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in range(40):
                reply = client.post(
                    "/v1/chat/completions",
                    json={
                        "model": "qwen2.5:7b",
                        "messages": [{"role": "user", "content": f"{i}"}],
                        "stream": i % 2 == 0,
                    },
                )
                assert reply.status_code == 200
        # The writer waits up to 5 s per batch: these rows are still queued now.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    count = sqlite3.connect(tmp_path / "kvern.db").execute("SELECT count(*) FROM requests")
    assert count.fetchone() == (40,)


def test_sigterm_while_the_tokenizer_still_loads_exits_and_keeps_the_row(
    tmp_path: Path, upstream: tuple[str, FakeVLLMState], tokenizer_fixtures: dict[str, Any]
) -> None:
    # An exact name: the parity check starts loading the tokenizer at start-up,
    # and the first request's tracking waits on that same load. Stopping then
    # used to cancel the load for both, and shutdown waited forever.
    config = tmp_path / "config.yaml"
    config.write_text(
        f"upstream:\n  base_url: {upstream[0]}/v1\n"
        f"tokenizers:\n  models:\n    'qwen2.5:7b': {tokenizer_fixtures['qwen2'].directory}\n",
        encoding="utf-8",
    )
    with kvern_process(["-m", "kvern", "serve", "--config", str(config)], tmp_path) as (proc, url):
        reply = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "qwen2.5:7b", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert reply.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    count = sqlite3.connect(tmp_path / "kvern.db").execute("SELECT count(*) FROM requests")
    assert count.fetchone() == (1,)
