"""The dashboard in a real browser, after a real trace through kvern.

openai client -> kvern (its own process, as users run it) -> two real
llama-servers (tiny random-weight model, the real Qwen2 tokenizer and
Qwen2.5 template), routed by session. Then Debian's headless Chromium,
driven by Playwright for Python, opens the dashboard: it must load with no
console error, every chart's points must carry the figures ``/analytics``
gives, the prefix tree's spine must be the trace's shared system prompt, and
a screenshot is written under the test's tmp dir (and to
``/tmp/kvern-dashboard.png``) for a person to look at.

Playwright's own browser download cannot work on these machines; the test
uses the system's ``chromium`` (``.ci/system-deps`` installs it) and skips,
saying so, only where there is none.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.llama_server import llama_server, tiny_model
from tests.servers import kvern_process
from tests.truth import client_for, flush, stream_chat

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no chromium on PATH: run .ci/system-deps (Debian's chromium package); "
        "Playwright's own browser download cannot work offline",
    ),
]

REPO = Path(__file__).resolve().parent.parent
MODEL = "tiny-qwen2"
SYSTEM = (
    "You are Kestrel, the support assistant of the kvern dashboard trace. Answer in one short "
    "sentence, quote exact menu paths (Settings > Billing > Invoices) and never promise dates. "
    "Plans: Starter (1 vCPU, 2 GB), Team (4 vCPU, 8 GB), Scale (16 vCPU, 64 GB); every plan "
    "keeps daily backups for 14 days. "
) * 2
# Session keys whose rendezvous hashes put two conversations on each upstream
# (alice and erin on llama-a, bob and carol on llama-b).
USERS = ("alice", "bob", "erin", "carol")
QUESTIONS = ("How do I get an invoice?", "Why did my deploy fail?", "Where are backups?", "Hi!")
BUCKET_S = 2
SCREENSHOT_COPY = Path("/tmp/kvern-dashboard.png")
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def upstreams() -> Iterator[list[str]]:
    model = tiny_model("qwen2")
    with llama_server(model) as a, llama_server(model) as b:
        yield [a, b]


def write_config(tmp_path: Path, urls: list[str], fixtures: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    data = {
        "upstream": {"read_timeout_s": 60},
        "upstreams": [
            # llama-server reuses any number of tokens: blocks of one.
            {"name": name, "url": url + "/v1", "kv_capacity_tokens": 8192, "block_size": 1}
            for name, url in zip(("llama-a", "llama-b"), urls, strict=True)
        ],
        "routing": {"policy": "session"},
        "tokenizers": {"models": {MODEL: str(fixtures["qwen2"].directory)}},
        "trie": {"block_size": 1, "min_prefix_tokens": 1},
        "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 20},
    }
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def trace(kvern: str, users: tuple[str, ...], turns: int, pause_s: float) -> int:
    """Conversations sharing SYSTEM, one turn each in rotation, every other one streamed.

    Each request is the whole conversation so far, as chat clients send it.
    """
    client = client_for(kvern)
    chats = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[i]}]
        for i in range(len(users))
    ]
    sent = 0
    for turn in range(turns):
        for i, (user, messages) in enumerate(zip(users, chats, strict=True)):
            if (turn + i) % 2:
                stream_chat(client, MODEL, messages, user=user)
            else:
                client.chat.completions.create(
                    model=MODEL,
                    messages=messages,  # type: ignore[arg-type]
                    max_tokens=8,
                    temperature=0,
                    user=user,
                )
            # The history carries a scripted answer, as agent frameworks write it: the
            # tiny model's random-weight samples would not re-tokenize canonically.
            messages += [
                {"role": "assistant", "content": f"Answer {turn} for {user}: see Settings."},
                {"role": "user", "content": f"Thanks. Turn {turn}: and then?"},
            ]
            sent += 1
        time.sleep(pause_s)  # the trace spans several buckets: charts with several points
    return sent


def get(kvern: str, path: str, key: str | None = None, **params: Any) -> dict[str, Any]:
    headers = {"x-kvern-admin-key": key} if key else {}
    response = httpx.get(kvern + path, params=params, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return dict(response.json())


def expected_points(analytics: dict[str, Any]) -> set[tuple[str, str, int, float]]:
    """(chart, series, bucket start, value) of every point the charts should draw."""
    out: set[tuple[str, str, int, float]] = set()
    for p in analytics["timeseries"]:
        ts = p["bucket_start_s"]
        for series, value in (
            ("hit_rate", p["hit_rate"]),
            ("token_reuse_ratio", p["token_reuse_ratio"]),
        ):
            if value is not None:
                out.add(("reuse", series, ts, value))
        pvr = p["predicted_vs_reported"]
        if pvr["requests_with_report"]:
            out.add(("calibration", "predicted", ts, pvr["predicted_cached_tokens"]))
            out.add(("calibration", "reported", ts, pvr["reported_cached_tokens"]))
    for p in analytics["ttfb_by_hit"]["timeseries"]:
        for split in ("hit", "miss"):
            if p[split]["p50"] is not None:
                out.add(("ttfb", split, p["bucket_start_s"], p[split]["p50"]))
    return out


def wait_for_refreshes(page: Any, more: int, timeout_s: float = 30.0) -> None:
    """Wait until the page has ended ``more`` refreshes past the current count.

    Polled from here: the page's Content-Security-Policy forbids the string
    evaluation ``page.wait_for_function`` would need.
    """

    def done() -> int:
        return int(page.get_attribute("body", "data-refreshes") or 0)

    target = done() + more
    deadline = time.monotonic() + timeout_s
    while done() < target:
        assert time.monotonic() < deadline, "the dashboard stopped refreshing"
        time.sleep(0.2)


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)


class Console:
    """Every console message and uncaught page error, for the no-errors check."""

    def __init__(self, page: Any) -> None:
        self.messages: list[tuple[str, str]] = []
        self.page_errors: list[str] = []
        page.on("console", lambda m: self.messages.append((m.type, m.text)))
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))

    def errors(self) -> list[str]:
        return self.page_errors + [text for kind, text in self.messages if kind == "error"]


def test_the_dashboard_shows_a_real_trace_in_a_real_browser(
    tmp_path: Path, upstreams: list[str], tokenizer_fixtures: dict[str, Any]
) -> None:
    from playwright.sync_api import sync_playwright

    config = write_config(tmp_path, upstreams, tokenizer_fixtures)
    args = ["-m", "kvern", "serve", "--config", str(config)]
    with kvern_process(args, cwd=REPO, log_path=tmp_path / "kvern.log") as (_, kvern):
        with sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            console = Console(page)
            page.goto(kvern + "/")  # redirects to /dashboard
            assert page.url == kvern + "/dashboard"
            page.wait_for_selector("body[data-loaded='true']", timeout=30_000)
            # Before any request every panel says what to do.
            for target in ("#chart-reuse", "#chart-calibration", "#chart-ttfb", "#tree"):
                empty = page.text_content(f"{target} [data-empty]") or ""
                assert f"point your client at {kvern}/v1" in empty, (target, empty)
            page.screenshot(path=str(tmp_path / "empty.png"), full_page=True)
            page.goto(f"{kvern}/dashboard?window=1h&bucket={BUCKET_S}")
            page.wait_for_selector("body[data-loaded='true']", timeout=30_000)

            # The trace, with the page open: it shows up by itself (auto-refresh).
            sent = trace(kvern, USERS, turns=3, pause_s=BUCKET_S)
            flush(kvern)
            wait_for_refreshes(page, 2)  # one that began after the flush, whole
            page.wait_for_selector("svg[data-chart='tree'] g.node", timeout=30_000)
            analytics = get(kvern, "/analytics", window="1h", bucket=BUCKET_S)
            tree = get(kvern, "/trie/tree", max_nodes=60)
            health = get(kvern, "/health")

            # Every chart's points are /analytics' figures, and there are several.
            drawn = page.eval_on_selector_all(
                "circle.point",
                "els => els.map(e => [e.dataset.chart, e.dataset.series, +e.dataset.ts,"
                " +e.dataset.value])",
            )
            assert {tuple(d) for d in drawn} == expected_points(analytics)
            assert len(drawn) == len(expected_points(analytics))
            for chart in ("reuse", "calibration", "ttfb"):
                assert len({d[2] for d in drawn if d[0] == chart}) >= 2, chart
            bars = page.eval_on_selector_all(
                "svg[data-chart='calibration_upstreams'] rect.bar",
                "els => els.map(e => [e.dataset.upstream, e.dataset.model, e.dataset.series,"
                " +e.dataset.value])",
            )
            assert sorted(map(tuple, bars)) == sorted(
                (c["upstream"], c["model"], series, c[f"{series}_cached_tokens"])
                for c in analytics["calibration"]
                for series in ("predicted", "reported")
            )
            assert {c["upstream"] for c in analytics["calibration"]} == {"llama-a", "llama-b"}
            summary = analytics["summary"]
            assert summary["requests"] == sent and summary["hits"] >= sent - 1
            requests_tile = page.text_content("[data-tile='requests'] .tile-value")
            assert requests_tile == str(sent)

            # Upstreams: both, healthy, circuits closed; tracking healthy, no warning.
            cards = page.eval_on_selector_all(
                ".upstream",
                "els => els.map(e => [e.dataset.upstream, e.dataset.healthy, e.dataset.circuit])",
            )
            assert sorted(map(tuple, cards)) == [
                ("llama-a", "true", "closed"),
                ("llama-b", "true", "closed"),
            ]
            assert health["tracking"]["backlog"] == 0
            assert page.is_visible("[data-tracking='ok']")
            assert page.query_selector_all(".warning") == []

            # The tree: the spine is the deepest node every request went through,
            # and it shows the shared system prompt.
            every = [n for n in tree["nodes"] if n["hits"] == sent]
            assert every, tree
            deepest = max(every, key=lambda n: n["depth"])
            assert tree["spine"][-1] == deepest["id"]
            spine_ids = page.eval_on_selector_all(
                "g.node[data-spine='true']", "els => els.map(e => +e.dataset.nodeId)"
            )
            assert spine_ids == tree["spine"]
            caption = page.text_content("[data-spine-id] q") or ""
            assert "You are Kestrel, the support assistant" in caption
            page.hover(f"g.node[data-node-id='{deepest['id']}']")
            detail = page.text_content("#tree-detail") or ""
            assert SYSTEM[:150] in detail
            assert f"{sent} hits" in detail
            shown = page.eval_on_selector_all("g.node", "els => els.length")
            assert shown == len(tree["nodes"]) and shown > len(USERS)

            # What the page was compared with, beside its screenshot.
            (tmp_path / "analytics.json").write_text(json.dumps(analytics, indent=1))
            (tmp_path / "tree.json").write_text(json.dumps(tree, indent=1))
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            shutil.copyfile(shot, SCREENSHOT_COPY)
            print(f"dashboard screenshot: {shot} (copy: {SCREENSHOT_COPY})")
            assert console.errors() == [], console.messages
            browser.close()


def test_with_an_admin_key_the_page_asks_for_it_and_then_shows_the_data(
    tmp_path: Path, upstreams: list[str], tokenizer_fixtures: dict[str, Any]
) -> None:
    from playwright.sync_api import sync_playwright

    key = "dashboard-admin-key"
    config = write_config(tmp_path, upstreams, tokenizer_fixtures)
    args = ["-m", "kvern", "serve", "--config", str(config)]
    env = {"KVERN_ADMIN_KEY": key}
    with kvern_process(args, cwd=REPO, env=env, log_path=tmp_path / "kvern.log") as (_, kvern):
        sent = trace(kvern, USERS[:2], turns=2, pause_s=0)
        assert httpx.get(kvern + "/analytics").status_code == 401
        assert httpx.get(kvern + "/trie/tree").status_code == 401
        httpx.get(kvern + "/analytics", params={"wait_s": 60}, headers={"x-kvern-admin-key": key})
        with sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            console = Console(page)
            page.goto(kvern + "/dashboard")
            page.wait_for_selector("#login:not([hidden])", timeout=30_000)
            assert page.get_attribute("body", "data-loaded") == "false"
            assert page.query_selector_all("circle.point") == []
            page.screenshot(path=str(tmp_path / "login.png"))
            # A wrong key is refused: the prompt comes back and says so.
            page.fill("#login-key", "not-the-key")
            page.click("#login-form button[type='submit']")
            page.wait_for_selector("#login-message:has-text('refused')", timeout=30_000)
            assert page.is_visible("#login")
            page.fill("#login-key", key)
            page.click("#login-form button[type='submit']")
            page.wait_for_selector("body[data-loaded='true']", timeout=30_000)
            assert page.is_hidden("#login")
            assert page.text_content("[data-tile='requests'] .tile-value") == str(sent)
            page.wait_for_selector("svg[data-chart='tree'] g.node[data-spine='true']")
            # The key stays in this browser: a reload shows the data without asking.
            page.reload()
            page.wait_for_selector("body[data-loaded='true']", timeout=30_000)
            assert page.is_hidden("#login")
            assert page.evaluate("localStorage.getItem('kvern.adminKey')") == key
            page.screenshot(path=str(tmp_path / "dashboard-with-key.png"), full_page=True)
            print(f"screenshots: {tmp_path / 'login.png'}, {tmp_path / 'dashboard-with-key.png'}")
            assert console.errors() == [], console.messages
            browser.close()


def test_a_model_without_a_tokenizer_is_a_visible_warning_with_one_upstream(
    tmp_path: Path,
) -> None:
    """A scripted upstream that cannot tokenize: kvern falls back, and the page warns."""
    from playwright.sync_api import sync_playwright
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from kvern.app import create_app
    from kvern.config import parse_config
    from tests.servers import serve, serve_chat

    async def answer(request: Request) -> JSONResponse:
        body = await request.json()
        message = {"role": "assistant", "content": "Fine."}
        return JSONResponse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
            }
        )

    with serve_chat(answer, "mystery-model") as upstream:
        config = parse_config(
            {
                "upstream": {"base_url": upstream + "/v1"},
                "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 20},
            }
        )
        with serve(create_app(config)) as kvern:
            client = client_for(kvern)
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
            for _ in range(3):
                client.chat.completions.create(model="mystery-model", messages=messages)  # type: ignore[arg-type]
            flush(kvern)
            with sync_playwright() as p:
                browser = launch(p)
                page = browser.new_page(viewport={"width": 1440, "height": 1000})
                console = Console(page)
                page.goto(kvern + "/dashboard")
                page.wait_for_selector("body[data-loaded='true']", timeout=30_000)
                warning = page.text_content("[data-warning='fallback']") or ""
                assert "mystery-model" in warning and "estimates" in warning
                assert page.is_visible("#warnings") and page.is_visible("[data-tracking='warn']")
                assert page.text_content("#status") == "degraded"
                # One upstream: its card says it is reachable and what it served.
                card = page.query_selector(".upstream")
                assert card is not None and card.get_attribute("data-healthy") == "true"
                assert "requests (window)3" in (card.text_content() or "")
                assert page.query_selector_all("circle.point[data-chart='reuse']")
                page.screenshot(path=str(tmp_path / "fallback.png"), full_page=True)
                print(f"screenshot: {tmp_path / 'fallback.png'}")
                assert console.errors() == [], console.messages
                browser.close()
