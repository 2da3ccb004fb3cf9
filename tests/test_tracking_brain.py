"""The brain in its own process: late routing answers, a killed or hung brain, bounded work.

Real HTTP on 127.0.0.1 throughout: simulated replicas with the real Qwen2
tokenizer (tests/replica_sim.py), kvern in front, the official openai client.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tests.servers import serve_chat
from tests.test_routing_e2e import (
    MODEL,
    analytics,
    chat_turn,
    client_for,
    kvern,
    replicas,
    routed_config,
    system_prompt,
)


def health(url: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/health", timeout=30).json())


def rows(db: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM requests ORDER BY ts_s")]
    finally:
        con.close()


def wait_for(predicate: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_late_routing_answers_book_presence_and_load_only_where_requests_went(
    tmp_path: Path, hf_tokenizers: dict[str, Any], tokenizer_fixtures: dict[str, Any]
) -> None:
    # A deadline no answer can meet: every decision misses it and goes by load.
    with replicas(hf_tokenizers["qwen2"], n=2) as reps:
        data = routed_config(
            tmp_path,
            [u for u, _ in reps],
            str(tokenizer_fixtures["qwen2"].directory),
            decision_timeout_ms=0.001,
        )
        data["upstream"]["cache_model"] = {"cache_generated": False}
        with kvern(data) as url:
            client = client_for(url)
            client.chat.completions.create(  # loads the tokenizer
                model=MODEL, messages=[{"role": "user", "content": "warm up"}], max_tokens=1
            )
            went: Counter[str] = Counter()
            for tenant in range(3):
                history = [{"role": "system", "content": system_prompt(tenant)}]
                for turn in range(4):
                    history.append({"role": "user", "content": f"Question {turn}?"})
                    upstream, answer, _ = chat_turn(client, history)
                    history.append({"role": "assistant", "content": answer})
                    went[upstream] += 1
            report = analytics(url)
            view = health(url)
    routing = view["routing"]
    assert routing["decision_timeouts"] >= 12
    assert report["routing"]["reasons"].get("no_prefix_info", 0) >= 12
    for u in routing["upstreams"]:
        assert u["load"]["in_flight"] == 0 and u["load"]["prefill_tokens"] == 0, u
        held = u["cache"].get(MODEL, {}).get("held_tokens", 0)
        # Presence only where requests really went.
        assert (held > 0) == (went[u["name"]] > 0), (u["name"], held, went)
    table = [r for r in rows(tmp_path / "kvern.db") if r["predicted_cached_tokens"] is not None]
    assert len(table) >= 12
    # Every prediction was made for the upstream that served the request, so
    # the simulated replicas' honest reports equal it request by request.
    wrong = [
        (r["upstream"], r["predicted_cached_tokens"], r["reported_cached_tokens"])
        for r in table
        if r["predicted_cached_tokens"] != r["reported_cached_tokens"]
    ]
    assert wrong == []


def test_a_brain_killed_under_load_fails_no_request_and_is_restarted(
    tmp_path: Path, hf_tokenizers: dict[str, Any], tokenizer_fixtures: dict[str, Any]
) -> None:
    with replicas(hf_tokenizers["qwen2"], n=2, max_concurrency=16) as reps:
        data = routed_config(
            tmp_path, [u for u, _ in reps], str(tokenizer_fixtures["qwen2"].directory)
        )
        with kvern(data) as url:
            client = client_for(url)
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "warm up"}], max_tokens=1
            )
            first_pid = health(url)["tracking"]["brain"]["pid"]
            errors: list[BaseException] = []
            done = Counter[str]()

            def session(i: int) -> None:
                stream_client = openai.OpenAI(
                    base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=30
                )
                history = [{"role": "system", "content": system_prompt(i % 4)}]
                for turn in range(6):
                    history.append({"role": "user", "content": f"Q{turn} of {i}?"})
                    try:
                        stream = stream_client.chat.completions.create(
                            model=MODEL, messages=history, max_tokens=8, stream=True
                        )
                        answer = "".join(
                            c.choices[0].delta.content or "" for c in stream if c.choices
                        )
                    except BaseException as exc:  # noqa: BLE001 - collected for the assert
                        errors.append(exc)
                        return
                    history.append({"role": "assistant", "content": answer})
                    done["requests"] += 1

            threads = [threading.Thread(target=session, args=(i,)) for i in range(12)]
            for t in threads:
                t.start()
            time.sleep(0.6)
            os.kill(first_pid, signal.SIGKILL)
            for t in threads:
                t.join(120)
            restarted = wait_for(
                lambda: (
                    (b := health(url)["tracking"]["brain"])["state"] == "up"
                    and b["pid"] != first_pid
                    and b
                ),
            )
            after = [
                chat_turn(client, [{"role": "user", "content": f"after {i}"}]) for i in range(3)
            ]
            report = analytics(url)
    assert errors == []
    assert done["requests"] == 12 * 6
    assert restarted and restarted["restarts"] >= 1, restarted
    assert "exit code -9" in (restarted["last_exit"] or "")
    assert len(after) == 3
    # Every request has its row: warm-up + 72 + 3.
    assert report["summary"]["requests"] == 1 + 12 * 6 + 3


def test_a_hung_brain_is_killed_and_replaced(
    tmp_path: Path, hf_tokenizers: dict[str, Any], tokenizer_fixtures: dict[str, Any]
) -> None:
    with replicas(hf_tokenizers["qwen2"], n=1) as reps:
        data = routed_config(
            tmp_path, [u for u, _ in reps], str(tokenizer_fixtures["qwen2"].directory)
        )
        data["tracking"] = {"hang_timeout_s": 1.0}
        with kvern(data) as url:
            client = client_for(url)
            # An up brain to hang: on a loaded machine a starting one can miss a
            # 1 s ping and be replaced before the test gets to it.
            first_pid = wait_for(
                lambda: (b := health(url)["tracking"]["brain"])["state"] == "up" and b["pid"]
            )
            assert first_pid, health(url)["tracking"]["brain"]
            os.kill(first_pid, signal.SIGSTOP)  # alive, answering nothing
            # Requests flow meanwhile (untracked), and /health answers at once.
            for i in range(3):
                chat_turn(client, [{"role": "user", "content": f"while hung {i}"}])
            started = time.monotonic()
            view = health(url)
            assert time.monotonic() - started < 5
            replaced = wait_for(
                lambda: (
                    (b := health(url)["tracking"]["brain"])["pid"] not in (None, first_pid)
                    and b["state"] == "up"
                    and b
                )
            )
    assert replaced, view["tracking"]["brain"]
    assert "did not answer a ping" in (replaced["last_exit"] or "")


# -- bounded work -----------------------------------------------------------------


@contextmanager
def scripted_upstream(answer: str) -> Iterator[str]:
    """A backend that answers every chat with ``answer`` (not streamed), with usage."""

    async def chat(request: Request) -> Response:
        body = json.loads(await request.body())
        return JSONResponse(
            {
                "id": "x",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
            }
        )

    with serve_chat(chat, MODEL) as url:
        yield url


def one_upstream_config(tmp_path: Path, url: str, tok_dir: str, **tracking: Any) -> dict[str, Any]:
    return {
        "upstream": {"base_url": url + "/v1", "read_timeout_s": 30.0},
        "tokenizers": {"models": {MODEL: tok_dir}, "parity_check": False},
        "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 20},
        "tracking": tracking,
    }


def test_prompts_beyond_a_context_are_skipped_and_long_answers_cut_to_one(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    tok_dir = str(tokenizer_fixtures["qwen2"].directory)
    with scripted_upstream("word " * 5000) as up:  # 25,000 chars > 1,000 tokens x 8
        with kvern(one_upstream_config(tmp_path, up, tok_dir, max_context_tokens=1000)) as url:
            client = client_for(url)
            short = [{"role": "user", "content": "hello"}]
            huge = [{"role": "user", "content": "many words " * 1000}]  # 11 KB > 8 KB
            client.chat.completions.create(model=MODEL, messages=short)
            client.chat.completions.create(model=MODEL, messages=huge)
            report = analytics(url)
            tracking = health(url)["tracking"]
    assert tracking["skipped"] == {"prompt_over_context": 1, "answer_over_context": 1}
    assert tracking["tracked"] == 1
    table = rows(tmp_path / "kvern.db")
    assert len(table) == 2 and report["summary"]["requests"] == 2
    assert [r["prompt_tokens"] is not None for r in table] == [True, False]
    assert all(r["status"] == 200 for r in table)


def test_tracking_on_a_thread_of_the_proxy_still_tracks(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    tok_dir = str(tokenizer_fixtures["qwen2"].directory)
    with scripted_upstream("fine") as up:
        with kvern(one_upstream_config(tmp_path, up, tok_dir, isolation="thread")) as url:
            client = client_for(url)
            for i in range(3):
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"same start, turn {i}"}]
                )
            httpx.get(url + "/analytics", params={"wait_s": 20}, timeout=30)
            brain = health(url)["tracking"]["brain"]
            trie = httpx.get(url + "/trie/visualize", timeout=30).json()
    assert brain["isolation"] == "thread" and brain["pid"] == os.getpid()
    assert trie[MODEL]["stats"]["tokens"] > 0
