"""The dashboard's "Why it missed" panel in a real browser, after a trace with a planted cause.

Each request's system prompt carries a fresh session UUID; kvern (its brain
in a thread of this process, a scripted upstream) finds the site, and the
page shows it: the place, both sides with the varying span marked, the
suggested rule with its measured saving, and reason bars equal to /analytics.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvern.app import create_app
from kvern.config import parse_config
from tests.servers import chat_answer, serve, serve_chat
from tests.test_dashboard_browser import CHROMIUM, Console, launch
from tests.truth import client_for, flush

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: run .ci/system-deps"),
]

SYSTEM = "You are the billing assistant of the kvern panel test. Session id: {sid}. Be brief. " * 3


def test_the_why_it_missed_panel_shows_the_planted_site_and_its_rule(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    from playwright.sync_api import sync_playwright

    with serve_chat(chat_answer, "m") as upstream:
        config = parse_config(
            {
                "upstream": {
                    "base_url": upstream + "/v1",
                    "cache_model": {"kind": "radix", "block_size": 16},
                },
                "tokenizers": {
                    "models": {"m": str(tokenizer_fixtures["qwen2"].directory)},
                    "parity_check": False,
                },
                "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 10},
                "tracking": {"isolation": "thread"},
            }
        )
        with serve(create_app(config)) as kvern:
            client = client_for(kvern)
            sids = [str(uuid.uuid4()) for _ in range(6)]
            for sid in sids:
                messages = [
                    {"role": "system", "content": SYSTEM.format(sid=sid)},
                    {"role": "user", "content": "Where is my invoice?"},
                ]
                client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
            flush(kvern)
            analytics = httpx.get(kvern + "/analytics", params={"window": "1h"}, timeout=60).json()
            with sync_playwright() as p:
                browser = launch(p)
                page = browser.new_page(viewport={"width": 1440, "height": 1200})
                console = Console(page)
                page.goto(kvern + "/dashboard")
                page.wait_for_selector("body[data-loaded='true']", timeout=30_000)
                site = page.query_selector("[data-panel='misses'] .site")
                assert site is not None
                assert site.get_attribute("data-place") == "system prompt"
                (expected,) = analytics["misses"]
                assert site.get_attribute("data-tokens") == str(expected["tokens_lost"])
                marks = page.query_selector_all("[data-panel='misses'] .pair mark")
                # Each marked span is a piece of a planted session id (where two ids
                # share leading characters, only the rest is marked).
                spans = [m.text_content() or "" for m in marks]
                assert len(spans) >= 2
                assert all(span and any(span in sid for sid in sids) for span in spans), spans
                rule = page.query_selector("[data-panel='misses'] pre.rule")
                assert rule is not None
                assert rule.get_attribute("data-pattern") == expected["advice"]["rule"]["pattern"]
                assert "replacement: '<uuid>'" in (rule.text_content() or "")
                bars = {
                    b.get_attribute("data-reason"): float(b.get_attribute("data-value") or 0)
                    for b in page.query_selector_all("rect.bar[data-chart='miss_reasons']")
                }
                reasons = analytics["miss_reasons"]
                assert bars["reused"] == reasons["reused_tokens"]
                assert bars["diverged"] == reasons["reasons"]["diverged"]["tokens"]
                panel = page.query_selector("[data-panel='misses']")
                assert panel is not None
                panel.screenshot(path=str(tmp_path / "misses.png"))
                print(f"screenshot: {tmp_path / 'misses.png'}")
                assert console.errors() == [], console.messages
                browser.close()
