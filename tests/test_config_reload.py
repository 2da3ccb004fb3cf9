"""Editing ``config.yaml`` while kvern runs: rules apply live, a bad edit is refused, SIGHUP.

The end-to-end tests run ``python -m kvern serve --config FILE`` as users do
(its brain a process of its own) in front of a scripted upstream. Every
request's system prompt carries a fresh request id, so the trie sees no
reuse until a normalization rule replaces the id; the rule is added by
editing the file, and reuse must rise after the mark ``/analytics`` shows.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from kvern.app import create_app
from kvern.config import load_config, parse_config
from kvern.config.watch import ConfigSource, ConfigWatcher, changes, rules_hash
from tests.servers import chat_answer, kvern_process, serve, serve_chat
from tests.truth import flush, rows

MODEL = "m"
SYSTEM = (
    "Request id: {rid}. You are the reload test's assistant: answer in one short sentence, "
    "quote exact menu paths (Settings > Billing > Invoices) and never promise dates. Plans: "
    "Starter, Team and Scale; every plan keeps daily backups for 14 days. "
) * 2
ID_RULE = {"pattern": r"Request id: [0-9a-f]+", "replacement": "Request id: <ID>"}
CHROMIUM = shutil.which("chromium")
T = TypeVar("T")


def settings(
    tmp_path: Path, upstream: str, fixtures: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "proxy": {"config_poll_s": 0.2},
        "upstream": {"base_url": upstream + "/v1", "cache_model": {"kind": "radix"}},
        "tokenizers": {"models": {MODEL: str(fixtures["qwen2"].directory)}, "parity_check": False},
        "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 20},
        "routing": {"health": {"interval_s": 0}},
    }
    for section, values in extra.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return data


def write(path: Path, data: dict[str, Any] | str) -> None:
    """As an editor saves: a new file renamed over the old one (a new inode)."""
    fresh = path.with_name(path.name + ".tmp")
    fresh.write_text(data if isinstance(data, str) else json.dumps(data))  # JSON is YAML
    os.replace(fresh, path)


def ask(kvern: str, n: int) -> None:
    """``n`` chats, each with a system prompt of its own request id."""
    for _ in range(n):
        system = SYSTEM.format(rid=uuid.uuid4().hex)
        body = {
            "model": MODEL,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}],
        }
        assert httpx.post(kvern + "/v1/chat/completions", json=body, timeout=30).status_code == 200


def wait_for(fn: Callable[[], T | None], what: str, timeout_s: float = 30.0) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def rules_changes(kvern: str) -> list[dict[str, Any]]:
    answer = httpx.get(kvern + "/analytics", params={"window": "all"}, timeout=30)
    assert answer.status_code == 200, answer.text
    changes: list[dict[str, Any]] = answer.json()["rules_changes"]
    return changes


def reuse(rows_: list[dict[str, Any]]) -> list[float]:
    """Each row's share of prompt tokens matched in the trie."""
    return [r["matched_tokens"] / r["prompt_tokens"] for r in rows_]


def log_has(log: Path, text: str) -> bool:
    return text in log.read_text(errors="replace")


# -- kvern serve, as users run it --------------------------------------------------


@pytest.mark.slow
def test_an_edited_rule_applies_live_and_a_bad_edit_keeps_the_running_rules(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    path, log = tmp_path / "config.yaml", tmp_path / "kvern.log"
    with serve_chat(chat_answer, MODEL) as upstream:
        data = settings(tmp_path, upstream, tokenizer_fixtures)
        write(path, data)
        args = ["-m", "kvern", "serve", "--config", str(path)]
        with kvern_process(args, cwd=tmp_path, log_path=log) as (_, kvern):
            ask(kvern, 4)
            flush(kvern)
            assert rules_changes(kvern) == []
            # The rule that keys the trie without the id, and a key that needs a restart.
            data["normalization"] = {"*": [ID_RULE]}
            data["proxy"]["max_body_bytes"] = 1 << 20
            write(path, data)
            (mark,) = wait_for(lambda: rules_changes(kvern), "the reload's mark")
            ask(kvern, 4)
            flush(kvern)
            assert mark["models"] == ["*"]
            assert mark["rules_hash"] == rules_hash(load_config(path, env={}))
            assert wait_for(lambda: log_has(log, "needs a restart: proxy.max_body_bytes"), "log")

            # A bad edit: refused with start-up's message, the running rules stay.
            bad = {**data, "normalization": {"*": [{**ID_RULE, "pattern": "Request id: ("}]}}
            write(path, bad)
            assert wait_for(lambda: log_has(log, "config.yaml not reloaded: "), "the refusal")
            ask(kvern, 2)
            flush(kvern)
            assert len(rules_changes(kvern)) == 1

            # A tracking process started later (this one is killed) gets the new rules too.
            health = httpx.get(kvern + "/health", timeout=30).json()
            os.kill(health["tracking"]["brain"]["pid"], signal.SIGKILL)

            def restarted() -> bool:
                brain = httpx.get(kvern + "/health", timeout=30).json()["tracking"]["brain"]
                return bool(brain["restarts"] >= 1 and brain["state"] == "up")

            wait_for(restarted, "a new tracking process")
            ask(kvern, 3)
            flush(kvern)
    text = log.read_text(errors="replace")
    assert "invalid regular expression" in text.split("config.yaml not reloaded: ", 1)[1]
    assert text.count("needs a restart") == 1  # logged once, not again with the bad edit
    table = rows(tmp_path / "kvern.db")
    assert len(table) == 13
    before = [r for r in table if r["ts_s"] < mark["ts_s"]]
    after = [r for r in table if r["ts_s"] >= mark["ts_s"]]
    assert len(before) == 4 and len(after) == 9
    # Before: only the template's first tokens are shared; after: all but the id's place.
    assert max(reuse(before)) < 0.1
    first_rules, bad_edit, new_brain = after[:4], after[4:6], after[6:]
    assert min(reuse(first_rules[1:])) > 0.9  # the first one after the mark keyed the new prefix
    assert min(reuse(bad_edit)) > 0.9  # still the new rules
    assert reuse(new_brain)[0] < 0.1 and min(reuse(new_brain[1:])) > 0.9  # an empty trie, new rules


@pytest.mark.slow
def test_sighup_reloads_at_once_without_a_poll(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    path, log = tmp_path / "config.yaml", tmp_path / "kvern.log"
    with serve_chat(chat_answer, MODEL) as upstream:
        data = settings(tmp_path, upstream, tokenizer_fixtures, proxy={"config_poll_s": 0})
        write(path, data)
        args = ["-m", "kvern", "serve", "--config", str(path)]
        with kvern_process(args, cwd=tmp_path, log_path=log) as (proc, kvern):
            proc.send_signal(signal.SIGHUP)  # nothing changed: logged, and kvern lives on
            wait_for(lambda: log_has(log, "config.yaml reloaded: nothing changed"), "the reload")
            data["normalization"] = {MODEL: [ID_RULE]}
            write(path, data)
            assert rules_changes(kvern) == []  # no poll: the edit waits for the signal
            proc.send_signal(signal.SIGHUP)
            (mark,) = wait_for(lambda: rules_changes(kvern), "the reload's mark")
            ask(kvern, 3)
            flush(kvern)
            assert proc.poll() is None
    assert mark["models"] == [MODEL]
    table = rows(tmp_path / "kvern.db")
    assert min(reuse(table[1:])) > 0.9


# -- in this process ------------------------------------------------------------------


def test_an_app_on_a_test_thread_watches_its_file_too(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    path = tmp_path / "config.yaml"
    with serve_chat(chat_answer, MODEL) as upstream:
        data = settings(tmp_path, upstream, tokenizer_fixtures, tracking={"isolation": "thread"})
        write(path, data)
        source = ConfigSource(path, lambda: load_config(path, env={}))
        # Signals cannot be listened to off the main thread: SIGHUP is then not watched.
        with serve(create_app(load_config(path, env={}), source=source)) as kvern:
            ask(kvern, 2)
            data["normalization"] = {"*": [ID_RULE]}
            write(path, data)
            wait_for(lambda: rules_changes(kvern), "the mark")
            ask(kvern, 2)
            flush(kvern)
            bucketed = httpx.get(kvern + "/analytics", params={"window": "1h", "bucket": 1}).json()
    assert len(bucketed["rules_changes"]) == 1 and bucketed["timeseries"]
    assert reuse(rows(tmp_path / "kvern.db"))[3] > 0.9


def _watched(path: Path, seen: list[Any]) -> ConfigWatcher:
    async def apply(running: Any, found: Any) -> None:
        seen.append(found)

    source = ConfigSource(path, lambda: load_config(path, env={}))
    return ConfigWatcher(source, load_config(path, env={}), apply, poll_s=0.05)


async def test_a_file_renamed_over_with_the_same_size_and_mtime_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    one = {"normalization": {"a": [{**ID_RULE, "replacement": "1"}]}}
    two = {"normalization": {"a": [{**ID_RULE, "replacement": "2"}]}}
    path.write_text(json.dumps(one))
    stat = path.stat()
    seen: list[Any] = []
    watcher = _watched(path, seen)
    watcher.start()
    try:
        write(path, json.dumps(two))  # same length
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert path.stat().st_size == stat.st_size
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.05)
    finally:
        await watcher.close()
    assert [c.rules_models for c in seen] == [["a"]]
    assert watcher.running.normalization["a"][0].replacement == "2"


async def test_trigger_reloads_an_unchanged_file_and_a_bad_one_is_counted(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("{}")
    seen: list[Any] = []
    watcher = _watched(path, seen)
    assert (await watcher.reload()) is not None and seen == []  # nothing to apply
    path.write_text("proxy: {port: 0}")
    assert await watcher.reload() is None
    assert watcher.num_errors == 1 and watcher.running.proxy.port == 8080


def test_changes_name_the_models_whose_rules_changed_and_every_other_key() -> None:
    rule = {"pattern": "x", "replacement": "y"}
    old = parse_config({"normalization": {"a*": [rule], "b": [rule]}})
    new = parse_config(
        {
            "normalization": {"a*": [rule], "b": [rule, rule], "c": [rule]},
            "proxy": {"port": 9000},
            "analytics": {"capture": {"path": "x.jsonl"}},
            "tokenizers": {"models": {"q": "some/hub-id"}},
        }
    )
    found = changes(old, new)
    assert found.rules_models == ["b", "c"]
    assert found.needs_restart == ["analytics.capture", "proxy.port", "tokenizers.models"]
    assert changes(old, old).rules_models == [] and changes(old, old).needs_restart == []
    # The same rules in another order apply in another order: a change.
    swapped = parse_config({"normalization": {"b": [rule], "a*": [rule]}})
    assert changes(old, swapped).rules_models == ["b", "a*"]
    assert rules_hash(old) != rules_hash(swapped) and rules_hash(old) == rules_hash(old)


# -- the dashboard's mark ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: run .ci/system-deps")
def test_the_dashboard_draws_the_rules_change_on_its_time_charts(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    from playwright.sync_api import sync_playwright

    path = tmp_path / "config.yaml"
    with serve_chat(chat_answer, MODEL) as upstream:
        data = settings(tmp_path, upstream, tokenizer_fixtures, tracking={"isolation": "thread"})
        write(path, data)
        source = ConfigSource(path, lambda: load_config(path, env={}))
        with serve(create_app(load_config(path, env={}), source=source)) as kvern:
            ask(kvern, 2)
            data["normalization"] = {"*": [ID_RULE]}
            write(path, data)
            (mark,) = wait_for(lambda: rules_changes(kvern), "the mark")
            ask(kvern, 2)
            flush(kvern)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page()
                page.goto(f"{kvern}/dashboard?window=1h&bucket=1")
                page.wait_for_selector("body[data-loaded='true']", timeout=30_000)
                selector = "svg[data-chart='reuse'] g.mark[data-mark='rules_changed']"
                page.wait_for_selector(selector, timeout=30_000)
                drawn = page.eval_on_selector_all(
                    "g.mark[data-mark='rules_changed']",
                    "els => els.map(e => [e.dataset.chart, Number(e.dataset.ts), e.textContent])",
                )
                page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
                browser.close()
    charts = {chart for chart, _, _ in drawn}
    assert {"reuse", "ttfb"} <= charts
    assert all(ts == mark["ts_s"] and text.startswith("rules changed") for _, ts, text in drawn)
