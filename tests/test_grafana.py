"""The Grafana board and the Prometheus example: every series they name is in a real scrape.

A board that queries a series kvern does not serve shows "No data" for ever,
silently; so the test scrapes a real kvern (its tracking process included,
so the brain's families are there) and checks each name the board's queries
use against what the scrape declares.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kvern.app import create_app
from kvern.config import parse_config
from tests.servers import chat_answer, serve, serve_chat
from tests.truth import flush

ROOT = Path(__file__).resolve().parent.parent
BOARD = ROOT / "deploy" / "grafana" / "kvern.json"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"

# The sample names each family type exposes in Prometheus's text format.
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
    "unknown": ("",),
}


def board() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(BOARD.read_text())
    return data


def queries(data: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in data["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in data["templating"]["list"] if v["type"] == "query"]
    return exprs


def declared_series(text: str) -> set[str]:
    """Every sample name the scrape declares, whether or not it has samples yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in _SUFFIXES[family.type])
        names.update(s.name for s in family.samples)
    return names


def test_every_series_the_grafana_board_queries_is_in_a_real_scrape(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    config = parse_config(
        {
            "upstream": {"cache_model": {"kind": "radix", "block_size": 16}},
            "tokenizers": {"models": {"*": str(tokenizer_fixtures["qwen2"].directory)}},
            "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 10},
        }
    )
    with serve_chat(chat_answer, "m") as upstream:
        data = config.model_dump()
        data["upstream"]["base_url"] = upstream + "/v1"
        with serve(create_app(parse_config(data))) as kvern:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            assert httpx.post(kvern + "/v1/chat/completions", json=body, timeout=30).is_success
            flush(kvern)
            text = httpx.get(kvern + "/metrics", timeout=30).text
    served = declared_series(text)
    named = {n for q in queries(board()) for n in re.findall(r"\bkvern_[a-z0-9_]+", q)}
    assert len(named) >= 20
    missing = sorted(named - served)
    assert missing == [], f"the board queries series kvern does not serve: {missing}"


def test_the_board_is_well_formed_for_grafana() -> None:
    data = board()
    panels = data["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"
            expr = t["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
    names = {v["name"] for v in data["templating"]["list"]}
    assert {"datasource", "model", "upstream"} <= names
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("hit rate", "reuse", "predicted", "first byte", "in-flight", "healthy", "phase"):
        assert topic in titles, topic


def test_the_prometheus_example_scrapes_metrics_with_the_admin_key_as_a_bearer_token() -> None:
    scrape = yaml.safe_load(SCRAPE_CONFIG.read_text())
    job = next(j for j in scrape["scrape_configs"] if j["job_name"] == "kvern")
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer"
    assert job["static_configs"][0]["targets"]
