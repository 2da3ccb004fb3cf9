"""The admin endpoints answer within about a second, whatever tracking is doing.

``/analytics``, ``/health`` and ``/trie/visualize`` wait briefly for tracking,
then answer with what is there and say what is still pending. Before: a model
mapped to a hub id on a machine without hub access started a tokenizer load
that huggingface_hub retried with back-off for ~47 s, and ``/analytics`` (10 s
drain) and ``/trie/visualize`` (10 s drain, then a 10 s call) waited on it; a
hung tracking process held them the same way. The bounds below are generous:
they catch that gap, not milliseconds.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.servers import blackhole, kvern_process
from tests.test_routing_e2e import client_for, kvern
from tests.test_tracking_brain import MODEL, one_upstream_config, scripted_upstream

ADMIN_BOUND_S = 3.0  # "about a second", with room for a busy 2-core machine


def timed_get(url: str, **params: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.get(url, params=params, timeout=60)
    return response, time.monotonic() - started


def test_admin_endpoints_answer_at_once_when_the_tokenizer_hub_never_answers(
    tmp_path: Path,
) -> None:
    log = tmp_path / "kvern.log"
    with scripted_upstream("fine") as up, blackhole() as hub:
        config = {
            "upstream": {"base_url": up + "/v1"},
            # The shipped mapping: hub ids.
            "tokenizers": {
                "models": {
                    "llama3.2*": "unsloth/Llama-3.2-3B-Instruct",
                    "qwen2.5*": "Qwen/Qwen2.5-7B-Instruct",
                }
            },
            "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 20},
        }
        (tmp_path / "kvern.yaml").write_text(yaml.safe_dump(config))
        env = {
            "HF_HUB_OFFLINE": "0",  # as on a user's machine: the hub is tried
            "HF_ENDPOINT": hub,  # connects, then never a byte
            "HF_HOME": str(tmp_path / "hf"),  # nothing cached
            "TRANSFORMERS_VERBOSITY": "warning",
        }
        args = ["-m", "kvern", "serve", "--config", str(tmp_path / "kvern.yaml")]
        with kvern_process(args, cwd=tmp_path, env=env, log_path=log) as (_, url):
            client = client_for(url)
            for model in ("llama3.2:3b", "qwen2.5:7b"):
                answer = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4
                )
                assert answer.choices[0].message.content == "fine"  # proxied unchanged
            # While the loads wait on the hub: each answers at once.
            report, analytics_s = timed_get(url + "/analytics")
            health, health_s = timed_get(url + "/health")
            trie, trie_s = timed_get(url + "/trie/visualize")
            # Asked to, it waits: every load has ended, every row is back.
            settled = httpx.get(url + "/analytics", params={"wait_s": 20}, timeout=60).json()
            hub_state = httpx.get(url + "/health", timeout=10).json()
    assert [r.status_code for r in (report, health, trie)] == [200, 200, 200]
    assert analytics_s < ADMIN_BOUND_S, analytics_s
    assert health_s < ADMIN_BOUND_S, health_s
    assert trie_s < ADMIN_BOUND_S, trie_s
    tracking = report.json()["tracking"]
    if not tracking["drained"]:  # answered before the loads ended: it says what is left
        assert tracking["pending"] >= 1 or tracking["waiting_for_tokenizer"], tracking
    assert hub_state["tokenizer_hub"]["state"] == "unreachable"
    assert hub_state["tokenizer_hub"]["endpoint"] == hub
    for model in ("llama3.2:3b", "qwen2.5:7b"):
        state = hub_state["tokenizers"][model]
        assert state["kind"] == "fallback"
        assert state["error"].startswith(f"hub unreachable: {hub}"), state
    assert settled["tracking"]["drained"] and settled["summary"]["requests"] == 2
    # One warning names the hub; no retry, per model or otherwise.
    lines = log.read_text(errors="replace").splitlines()
    warnings = [line for line in lines if "WARNING" in line and "hub" in line.lower()]
    assert len(warnings) == 1 and hub in warnings[0], warnings
    assert not [line for line in lines if "Retrying" in line]


def test_admin_endpoints_answer_at_once_while_the_tracking_process_hangs(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    tok_dir = str(tokenizer_fixtures["qwen2"].directory)
    with scripted_upstream("fine") as up:
        # Not replaced during the test: it hangs, it is not declared dead.
        config = one_upstream_config(tmp_path, up, tok_dir, hang_timeout_s=120)
        with kvern(config) as url:
            client = client_for(url)
            ask = {"model": MODEL, "messages": [{"role": "user", "content": "warm up"}]}
            client.chat.completions.create(**ask)
            warm = httpx.get(url + "/analytics", params={"wait_s": 30}, timeout=60).json()
            pid = httpx.get(url + "/health", timeout=10).json()["tracking"]["brain"]["pid"]
            os.kill(pid, signal.SIGSTOP)  # alive, answering nothing
            try:
                client.chat.completions.create(**ask)  # flows, its row owed
                report, analytics_s = timed_get(url + "/analytics")
                health, health_s = timed_get(url + "/health")
                trie, trie_s = timed_get(url + "/trie/visualize")
            finally:
                os.kill(pid, signal.SIGCONT)
            settled = httpx.get(url + "/analytics", params={"wait_s": 30}, timeout=60).json()
    assert warm["tracking_drained"] and warm["summary"]["requests"] == 1
    assert analytics_s < ADMIN_BOUND_S, analytics_s
    assert health_s < ADMIN_BOUND_S, health_s
    assert trie_s < ADMIN_BOUND_S, trie_s
    body = report.json()
    assert report.status_code == 200 and body["tracking_drained"] is False
    assert body["tracking"]["pending"] == 1 and "no answer" in body["tracking"]["error"]
    assert health.status_code == 200 and health.json()["tracking"]["brain"]["error"]
    assert health.json()["tracking"]["brain"]["rows_pending"] == 1
    assert trie.status_code == 503
    assert trie.json()["error"]["code"] == "tracking_unavailable"
    # Woken, it catches up: nothing was lost, only not waited for.
    assert settled["tracking_drained"] and settled["summary"]["requests"] == 2
