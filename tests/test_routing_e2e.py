"""Routing end to end: the openai client -> kvern -> four simulated vLLM-like replicas.

The replicas (tests/replica_sim.py) keep a real 16-token block prefix cache
and tokenize with the real Qwen2.5 tokenizer and chat template, like kvern, so
what they report cached is what kvern's routing should have earned.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvern.app import create_app
from kvern.config import parse_config
from tests.replica_sim import ReplicaState, create_replica
from tests.servers import free_port, serve

MODEL = "sim"
WORDS = "alpha beta gamma delta kernel cache prefix token replica router session".split()


def qwen_ids(tok: Any) -> Callable[[dict[str, Any]], list[int]]:
    def tokenize(body: dict[str, Any]) -> list[int]:
        text = tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    return tokenize


@contextmanager
def replicas(
    tok: Any,
    n: int = 4,
    *,
    capacity_blocks: int = 4000,
    max_concurrency: int = 8,
    decode_s_per_token: float = 0.001,
) -> Iterator[list[tuple[str, ReplicaState]]]:
    with ExitStack() as stack:
        out = []
        for i in range(n):
            app, state = create_replica(
                f"r{i}",
                capacity_blocks=capacity_blocks,
                max_concurrency=max_concurrency,
                prefill_s_per_token=1e-6,
                decode_s_per_token=decode_s_per_token,
                tokenize=qwen_ids(tok),
                model=MODEL,
            )
            out.append((stack.enter_context(serve(app)), state))
        yield out


def routed_config(
    tmp_path: Path, urls: list[str], tokenizer_dir: str, **routing: Any
) -> dict[str, Any]:
    return {
        "upstream": {"read_timeout_s": 10.0, "connect_timeout_s": 2.0},
        "upstreams": [
            {"name": f"r{i}", "url": url + "/v1", "kv_capacity_tokens": 64_000}
            for i, url in enumerate(urls)
        ],
        "routing": {"min_match_tokens": 32, **routing},
        "tokenizers": {"models": {MODEL: tokenizer_dir}, "parity_check": False},
        "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 20},
    }


@contextmanager
def kvern(data: dict[str, Any]) -> Iterator[str]:
    with serve(create_app(parse_config(data))) as url:
        yield url


@contextmanager
def routed(
    tmp_path: Path,
    hf_tokenizers: dict[str, Any],
    tokenizer_fixtures: dict[str, Any],
    *,
    n: int = 4,
    each: dict[str, Any] | None = None,
    **routing: Any,
) -> Iterator[tuple[str, list[tuple[str, ReplicaState]]]]:
    """``n`` Qwen2 replicas and kvern routing over them; ``each`` is merged into every upstream."""
    with replicas(hf_tokenizers["qwen2"], n=n) as reps:
        tok_dir = str(tokenizer_fixtures["qwen2"].directory)
        data = routed_config(tmp_path, [u for u, _ in reps], tok_dir, **routing)
        for entry in data["upstreams"]:
            entry.update(each or {})
        with kvern(data) as url:
            yield url, reps


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=20)


def system_prompt(tenant: int) -> str:
    rng = random.Random(tenant)
    return f"Tenant {tenant} rules: " + " ".join(rng.choice(WORDS) for _ in range(300))


def chat_turn(client: openai.OpenAI, messages: list[dict[str, Any]]) -> tuple[str, str, int]:
    """One chat call; returns (upstream, answer, reported cached tokens)."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=4
    )
    completion = raw.parse()
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens or 0
    return raw.headers["x-kvern-upstream"], completion.choices[0].message.content or "", cached


def run_sessions(url: str, tenants: int, turns: int) -> dict[int, list[tuple[str, int]]]:
    """Each tenant's session, turn by turn: where each turn went and what it found cached."""
    client = client_for(url)
    seen: dict[int, list[tuple[str, int]]] = {}
    histories = {t: [{"role": "system", "content": system_prompt(t)}] for t in range(tenants)}
    for turn in range(turns):
        for t in range(tenants):
            histories[t].append({"role": "user", "content": f"Question {turn} for {t}?"})
            upstream, answer, cached = chat_turn(client, histories[t])
            histories[t].append({"role": "assistant", "content": answer})
            seen.setdefault(t, []).append((upstream, cached))
    return seen


def analytics(url: str) -> dict[str, Any]:
    response = httpx.get(url + "/analytics", params={"window": "all", "wait_s": 20}, timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_cache_aware_keeps_each_session_on_one_replica_and_spreads_tenants(
    tmp_path: Path, hf_tokenizers: dict[str, Any], tokenizer_fixtures: dict[str, Any]
) -> None:
    with routed(tmp_path, hf_tokenizers, tokenizer_fixtures) as (url, _):
        client_for(url).chat.completions.create(  # loads the tokenizer
            model=MODEL, messages=[{"role": "user", "content": "warm up"}], max_tokens=1
        )
        httpx.get(url + "/trie/visualize", params={"wait_s": 20}, timeout=30)
        seen = run_sessions(url, tenants=8, turns=4)
        report = analytics(url)
        health = httpx.get(url + "/health").json()
    for tenant, turns in seen.items():
        homes = {upstream for upstream, _ in turns}
        assert len(homes) == 1, (tenant, turns)  # every turn found its prefix
        assert all(cached > 0 for _, cached in turns[1:]), (tenant, turns)
    used = {turns[0][0] for turns in seen.values()}
    assert len(used) >= 3, used  # eight new tenants spread by load over four replicas
    routing = report["routing"]
    assert routing["reasons"]["prefix"] >= 8 * 3
    rows = {row["upstream"]: row for row in routing["by_upstream"]}
    predicted = sum(r["predicted_cached_tokens"] for r in rows.values())
    reported = sum(r["reported_cached_tokens"] for r in rows.values())
    assert reported > 0 and abs(predicted - reported) <= 0.02 * reported, (predicted, reported)
    assert health["status"] == "ok" and health["routing"]["policy"] == "cache_aware"
    assert {u["name"] for u in health["routing"]["upstreams"]} == {"r0", "r1", "r2", "r3"}
    held = [u["cache"][MODEL]["held_tokens"] for u in health["routing"]["upstreams"]]
    assert sum(1 for h in held if h > 0) >= 3


def test_a_hot_prefix_whose_holder_is_queued_is_copied_once_then_shared(
    tmp_path: Path, hf_tokenizers: dict[str, Any], tokenizer_fixtures: dict[str, Any]
) -> None:
    # Two one-slot replicas, each answer ~0.2 s: a second request at the
    # holder waits for the first. The tenant's prompt is hot after a few
    # sessions (threshold lowered so a test's rate reaches it).
    routing = {"hot_prefix_per_s": 0.5, "hot_prefix_replicas": 2, "decode_load_tokens": 64}
    with replicas(hf_tokenizers["qwen2"], n=2, max_concurrency=1, decode_s_per_token=0.05) as reps:
        tok_dir = str(tokenizer_fixtures["qwen2"].directory)
        data = routed_config(tmp_path, [u for u, _ in reps], tok_dir, **routing)
        for entry in data["upstreams"]:
            entry["max_concurrency"] = 1
        with kvern(data) as url:
            client = client_for(url)
            client.chat.completions.create(  # loads the tokenizer: later requests route by prefix
                model=MODEL, messages=[{"role": "user", "content": "warm up"}], max_tokens=1
            )
            httpx.get(url + "/trie/visualize", params={"wait_s": 20}, timeout=30)
            system = {"role": "system", "content": system_prompt(0)}

            def new_session(k: int, pause_s: float = 0.0) -> tuple[str, str, int]:
                time.sleep(pause_s)  # the previous answer's load is released first
                return chat_turn(client, [system, {"role": "user", "content": f"Session {k}?"}])

            first = [new_session(k, 0.1) for k in range(4)]  # one at a time: the holder is free
            home = first[0][0]
            with ThreadPoolExecutor(4) as pool:
                futures = []
                for k in range(4, 8):  # together: all but the first find the holder busy
                    futures.append(pool.submit(new_session, k))
                    time.sleep(0.05)  # each decision made before the next arrives
                burst = [f.result() for f in futures]
            later = [new_session(k, 0.1) for k in range(8, 12)]
            reasons = analytics(url)["routing"]["reasons"]
    assert {u for u, _, _ in first} == {home}
    assert reasons.get("replicate") == 1, reasons  # copied once ...
    copy = next(u for u, _, _ in burst if u != home)
    assert any(u == copy and cached > 0 for u, _, cached in burst + later)  # ... and reused there
    assert all(cached > 0 for _, _, cached in later)  # both hold it: every later session hits


def test_round_robin_scatters_sessions_and_recomputes_prefixes(
    tmp_path: Path, hf_tokenizers: dict[str, Any], tokenizer_fixtures: dict[str, Any]
) -> None:
    routing = {"policy": "round_robin"}
    with routed(tmp_path, hf_tokenizers, tokenizer_fixtures, **routing) as (url, reps):
        seen = run_sessions(url, tenants=3, turns=4)
    for turns in seen.values():
        assert len({upstream for upstream, _ in turns}) > 1
    assert sum(s.prefill_tokens_computed for _, s in reps) > 0


def test_a_refusing_replica_is_failed_over_and_its_circuit_opens(
    tmp_path: Path, hf_tokenizers: dict[str, Any], tokenizer_fixtures: dict[str, Any]
) -> None:
    routing = {"policy": "round_robin", "health": {"interval_s": 0}}
    with routed(tmp_path, hf_tokenizers, tokenizer_fixtures, **routing) as (url, reps):
        reps[0][1].fail_mode = "refuse"
        client = client_for(url)
        for i in range(12):
            upstream, _, _ = chat_turn(client, [{"role": "user", "content": f"hi {i}"}])
            assert upstream != "r0"
        health = httpx.get(url + "/health").json()
        report = analytics(url)
    r0 = next(u for u in health["routing"]["upstreams"] if u["name"] == "r0")
    assert r0["circuit"] == "open" and r0["failures"] == 3 and "503" in r0["last_error"]
    assert health["status"] == "degraded"
    assert reps[0][1].refused == 3  # then the open circuit kept requests away
    rows = {row["upstream"]: row for row in report["routing"]["by_upstream"]}
    assert "r0" not in rows and sum(r["arrived_by_failover"] for r in rows.values()) == 3


def test_no_reachable_upstream_is_a_clear_503(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    tok_dir = str(tokenizer_fixtures["qwen2"].directory)
    with kvern(routed_config(tmp_path, urls, tok_dir, health={"interval_s": 0})) as url:
        client = client_for(url)
        statuses = []
        for _ in range(4):
            with pytest.raises(openai.APIStatusError) as info:
                chat_turn(client, [{"role": "user", "content": "anyone?"}])
            statuses.append(info.value.status_code)
        body = info.value.response.json()
        health = httpx.get(url + "/health")
    assert statuses[0] == 502  # both tried, both refused the connection
    assert statuses[-1] == 503  # now every circuit is open: kvern answers at once
    message = body["error"]["message"]
    assert body["error"]["code"] == "no_healthy_upstream"
    assert "r0" in message and "r1" in message and "circuit open" in message
    assert health.status_code == 503 and health.json()["status"] == "down"
    rows = (
        sqlite3.connect(tmp_path / "kvern.db")
        .execute("SELECT upstream, status, error FROM requests ORDER BY ts_s")
        .fetchall()
    )
    assert rows[-1] == ("-", 503, "no_healthy_upstream")  # refused, and still recorded


def test_a_model_no_upstream_serves_is_refused_by_name(
    tmp_path: Path, hf_tokenizers: dict[str, Any], tokenizer_fixtures: dict[str, Any]
) -> None:
    served = {"models": ["sim*"]}
    with routed(tmp_path, hf_tokenizers, tokenizer_fixtures, n=2, each=served) as (url, _):
        response = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "other", "messages": [{"role": "user", "content": "x"}]},
        )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_served"
    assert "'other'" in response.json()["error"]["message"]


def test_session_policy_sticks_to_the_header(
    tmp_path: Path, hf_tokenizers: dict[str, Any], tokenizer_fixtures: dict[str, Any]
) -> None:
    with routed(tmp_path, hf_tokenizers, tokenizer_fixtures, policy="session") as (url, _):
        homes: dict[str, set[str]] = {}
        for i in range(24):
            session = f"s{i % 6}"
            r = httpx.post(
                url + "/v1/chat/completions",
                headers={"x-session-id": session},
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"q{i}"}],
                    "max_tokens": 1,
                },
                timeout=20,
            )
            assert r.status_code == 200
            homes.setdefault(session, set()).add(r.headers["x-kvern-upstream"])
    assert all(len(h) == 1 for h in homes.values())
    assert len(set().union(*homes.values())) >= 2
