"""The dashboard's routes: the page and its files, ``/`` leading there, ``/trie/tree``, TTFB by hit.

Fast tests with the real Qwen2 tokenizer behind a vLLM-like upstream; the
page itself is driven in a real browser in tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvern.app import create_app
from kvern.config import parse_config
from kvern.routes.dashboard import STATIC_DIR
from kvern.tokenize.registry import TokenizerRegistry
from kvern.tracking.forest import TrieForest
from kvern.tracking.tree_view import busiest_model, tree_of
from tests.fake_vllm import FakeVLLMState, create_fake_vllm
from tests.servers import serve

MODEL = "qwen2.5:7b"
SYSTEM = "You are Kestrel, the support assistant of the kvern dashboard tests. " * 6
KEY = "dash-secret-key"


@pytest.fixture(scope="module")
def upstream(hf_tokenizers: dict[str, Any]) -> Iterator[tuple[str, FakeVLLMState]]:
    app, state = create_fake_vllm({MODEL: hf_tokenizers["qwen2"]})
    with serve(app) as url:
        yield url, state


def running(tmp_path: Path, upstream_url: str, fixtures: dict[str, Any], **proxy: Any) -> Any:
    config = parse_config(
        {
            "proxy": proxy,
            "upstream": {"base_url": upstream_url + "/v1", "read_timeout_s": 5.0},
            "tokenizers": {"models": {"qwen2.5*": str(fixtures["qwen2"].directory)}},
            "trie": {"min_prefix_tokens": 4},
            "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 20},
        }
    )
    return serve(create_app(config))


@pytest.fixture
def kvern(
    tmp_path: Path, upstream: tuple[str, FakeVLLMState], tokenizer_fixtures: dict[str, Any]
) -> Iterator[str]:
    with running(tmp_path, upstream[0], tokenizer_fixtures) as url:
        yield url


def conversations(kvern: str, num: int = 3, turns: int = 2) -> int:
    """``num`` chats sharing SYSTEM, ``turns`` each, interleaved; returns the requests sent."""
    client = openai.OpenAI(base_url=kvern + "/v1", api_key="x", max_retries=0)
    chats = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Chat {c} asks."}]
        for c in range(num)
    ]
    for turn in range(turns):
        for c, messages in enumerate(chats):
            reply = client.chat.completions.create(
                model=MODEL,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=4,
            )
            messages += [
                {"role": "assistant", "content": reply.choices[0].message.content or ""},
                {"role": "user", "content": f"Chat {c}, turn {turn}: more."},
            ]
    return num * turns


def test_the_root_redirects_to_the_dashboard(kvern: str) -> None:
    response = httpx.get(kvern + "/", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == "/dashboard"


def test_the_page_and_every_file_it_names_are_served_with_their_types(kvern: str) -> None:
    page = httpx.get(kvern + "/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    named = re.findall(r'(?:href|src)="(/dashboard/static/[^"]+)"', page.text)
    assert len(named) == 3, named  # icon, styles, the script (which imports the rest)
    imported = {
        f"/dashboard/static/{name}"
        for path in STATIC_DIR.glob("*.js")
        for name in re.findall(r'from "\./([\w.]+)"', path.read_text())
    }
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for path in sorted(set(named) | imported):
        response = httpx.get(kvern + path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(types[Path(path).suffix]), path
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.content == (STATIC_DIR / Path(path).name).read_bytes()
    # Every script is used: nothing in static/ that the page does not load.
    scripts = {f"/dashboard/static/{p.name}" for p in STATIC_DIR.glob("*.js")}
    assert scripts <= set(named) | imported


@pytest.mark.parametrize(
    "path", ["/dashboard/static/nope.js", "/dashboard/static/..%2F..%2Fapp.py", "/dashboard/x"]
)
def test_what_is_not_a_dashboard_file_is_a_json_404(kvern: str, path: str) -> None:
    response = httpx.get(kvern + path)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_the_tree_before_any_request_is_empty(kvern: str) -> None:
    body = httpx.get(kvern + "/trie/tree", timeout=30).json()
    assert body["model"] is None and body["nodes"] == [] and body["models"] == []
    assert body["tracking"]["drained"] is True


def test_the_tree_has_the_shared_system_prompt_as_its_spine(kvern: str) -> None:
    sent = conversations(kvern, num=3, turns=2)
    body = httpx.get(kvern + "/trie/tree", params={"wait_s": 30}, timeout=60).json()
    assert body["model"] == MODEL and body["models"] == [MODEL]
    assert body["requests"] == sent
    nodes = body["nodes"]
    by_id = {n["id"]: n for n in nodes}
    for n in nodes:  # parents first, depths add up, hits never grow downwards
        assert n["edge_tokens"] > 0 and n["hits"] >= 1
        if n["parent"] is None:
            assert n["depth"] == n["edge_tokens"]
        else:
            parent = by_id[n["parent"]]
            assert parent["id"] < n["id"]
            assert n["depth"] == parent["depth"] + n["edge_tokens"]
            assert n["hits"] <= parent["hits"]
            assert n["prefix_text"].endswith(n["text"][-50:]) or "chars]" in n["prefix_text"]
    # The spine: one chain from the root through which every request went.
    spine = [by_id[i] for i in body["spine"]]
    assert spine and spine[0]["parent"] is None
    assert all(b["parent"] == a["id"] for a, b in zip(spine, spine[1:], strict=False))
    assert spine[-1]["hits"] == sent
    assert SYSTEM[:200] in "".join(n["text"] for n in spine)
    # Below it the three chats part ways.
    branches = [n for n in nodes if n["parent"] == spine[-1]["id"]]
    assert len(branches) == 3
    assert all(n["hits"] == 2 for n in branches)


def test_the_tree_keeps_the_most_hit_nodes_and_their_ancestors(kvern: str) -> None:
    conversations(kvern, num=3, turns=2)
    full = httpx.get(kvern + "/trie/tree", params={"wait_s": 30}, timeout=60).json()
    few = httpx.get(kvern + "/trie/tree", params={"max_nodes": 2}).json()
    assert len(few["nodes"]) == 2 and few["truncated"] is True
    assert [n["parent"] for n in few["nodes"]] == [None, 0]
    assert few["nodes"][0]["hidden_children"] == 2  # three chats branch off; one is shown
    most = httpx.get(kvern + "/trie/tree", params={"min_hits": full["requests"]}).json()
    assert all(n["hits"] == full["requests"] for n in most["nodes"])
    assert [n["id"] for n in most["nodes"]] == most["spine"]


def test_an_unknown_model_is_a_400(kvern: str) -> None:
    conversations(kvern, num=1, turns=1)
    httpx.get(kvern + "/trie/tree", params={"wait_s": 30}, timeout=60)
    response = httpx.get(kvern + "/trie/tree", params={"model": "nope"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"


def test_the_tree_and_the_data_need_the_admin_key_but_the_page_does_not(
    tmp_path: Path, upstream: tuple[str, FakeVLLMState], tokenizer_fixtures: dict[str, Any]
) -> None:
    with running(tmp_path, upstream[0], tokenizer_fixtures, admin_api_key=KEY) as kvern:
        assert httpx.get(kvern + "/trie/tree").status_code == 401
        assert httpx.get(kvern + "/analytics").status_code == 401
        # The page holds no data: it loads, then asks for the key.
        assert httpx.get(kvern + "/dashboard").status_code == 200
        assert httpx.get(kvern + "/dashboard/static/dashboard.js").status_code == 200
        # Without the key /health is the bare liveness answer the page reads as "key needed".
        assert "tracking" not in httpx.get(kvern + "/health").json()
        ok = httpx.get(kvern + "/trie/tree", headers={"x-kvern-admin-key": KEY})
        assert ok.status_code == 200 and ok.json()["nodes"] == []
        bearer = httpx.get(kvern + "/trie/tree", headers={"authorization": f"Bearer {KEY}"})
        assert bearer.status_code == 200


def test_analytics_splits_time_to_first_byte_by_hit_over_time(kvern: str) -> None:
    sent = conversations(kvern, num=2, turns=2)
    body = httpx.get(
        kvern + "/analytics", params={"window": "all", "bucket": 3600, "wait_s": 30}, timeout=60
    ).json()
    summary = body["summary"]
    overall = body["ttfb_by_hit"]["overall"]
    assert overall["hit"]["requests"] == summary["hits"] and summary["hits"] >= 2
    assert overall["miss"]["requests"] == summary["misses"] >= 1
    assert overall["hit"]["requests"] + overall["miss"]["requests"] == sent
    # The same nearest-rank percentiles as the summary's own split.
    for split in ("hit", "miss"):
        for p in ("p50", "p90", "p99"):
            assert overall[split][p] == summary["ttfb_ms"][split][p]
    series = body["ttfb_by_hit"]["timeseries"]
    assert sum(b["hit"]["requests"] + b["miss"]["requests"] for b in series) == sent
    assert [b["bucket_start_s"] for b in series] == [
        p["bucket_start_s"] for p in body["timeseries"]
    ]


def test_analytics_before_any_request_has_empty_ttfb_splits(kvern: str) -> None:
    body = httpx.get(kvern + "/analytics", params={"bucket": 60}).json()
    assert body["ttfb_by_hit"]["overall"]["hit"] == {
        "requests": 0,
        "p50": None,
        "p90": None,
        "p99": None,
    }
    assert body["ttfb_by_hit"]["timeseries"] == []


def test_tree_of_a_trie_without_a_tokenizer_keeps_shape_and_no_text(
    tokenizer_fixtures: dict[str, Any],
) -> None:
    config = parse_config(
        {"tokenizers": {"models": {"m": str(tokenizer_fixtures["qwen2"].directory)}}}
    )
    forest = TrieForest(config.trie, config.eviction)
    assert busiest_model(forest) is None
    mt = forest.get("m")
    for tail in ([7, 8], [7, 9], [10]):
        mt.trie.insert([1, 2, 3, 4, *tail], now_s=1.0)
    quiet = forest.get("quiet")
    quiet.trie.insert([5], now_s=1.0)
    assert busiest_model(forest) == "m"
    tree = tree_of(mt, None, max_nodes=10)
    assert [(n["parent"], n["depth"], n["hits"]) for n in tree["nodes"]] == [
        (None, 4, 3),
        (0, 5, 2),
        (0, 5, 1),
        (1, 6, 1),
        (1, 6, 1),
    ]
    assert tree["spine"] == [0, 1] and tree["decoded"] is False
    assert all(n["text"] == "" for n in tree["nodes"])
    with pytest.raises(ValueError, match="max_nodes"):
        tree_of(mt, None, max_nodes=0)
    tok = TokenizerRegistry(config.tokenizers).get_sync("m")
    decoded = tree_of(mt, tok, max_nodes=1)
    assert decoded["nodes"][0]["text"] == tok.decode([1, 2, 3, 4])
    assert decoded["truncated"] is True
