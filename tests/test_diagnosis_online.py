"""Why it missed, online: a real trace's rows, /analytics' reasons and sites, /metrics.

openai client -> kvern (its brain in its own process) -> a real one-slot
llama-server. Each request's system prompt carries a fresh session UUID, the
classic cause of a prefix cache that never hits past the first line.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvern.app import create_app
from kvern.config import parse_config
from tests.llama_server import llama_server, tiny_model
from tests.servers import serve
from tests.test_metrics import scrape, total
from tests.truth import chat, client_for, flush, rows

MODEL = "tiny-qwen2"
SYSTEM = (
    "You are the support assistant of the kvern test shop. Session id: {sid}. "
    "Answer in one short sentence, name exact menu paths and never promise dates. " * 2
)


@pytest.fixture(scope="module")
def one_slot() -> Iterator[str]:
    with llama_server(tiny_model("qwen2"), slots=1) as url:
        yield url


def test_a_session_id_in_the_system_prompt_is_found_and_a_rule_suggested(
    tmp_path: Path, one_slot: str, tokenizer_fixtures: dict[str, Any]
) -> None:
    config = parse_config(
        {
            "upstream": {"base_url": one_slot + "/v1", "cache_model": {"kind": "llamacpp"}},
            "tokenizers": {"models": {MODEL: str(tokenizer_fixtures["qwen2"].directory)}},
            "trie": {"block_size": 1, "min_prefix_tokens": 1},
            "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 10},
        }
    )
    with serve(create_app(config)) as kvern:
        client = client_for(kvern)
        for _ in range(6):
            system = SYSTEM.format(sid=uuid.uuid4())
            chat(
                client,
                MODEL,
                [
                    {"role": "system", "content": system},
                    {"role": "user", "content": "Where do I change my plan?"},
                ],
            )
        flush(kvern)
        body = httpx.get(kvern + "/analytics", params={"window": "all"}, timeout=60).json()
        m = scrape(kvern)
    table = rows(tmp_path / "kvern.db")
    assert len(table) == 6
    for row in table:
        reused = row["reported_cached_tokens"]
        parts = reused + row["miss_tokens"] + row["lost_tokens"] + row["novel_tokens"]
        assert parts == row["prompt_tokens"], row
    assert table[0]["miss_reason"] == "cold"
    for row in table[1:]:
        assert row["miss_reason"] == "diverged", row
        assert row["diverge_place"] == "system prompt"
        # One slot holds the last prompt only: a longer prefix shared with an older
        # one (two ids starting alike) is kvern's, no longer the backend's.
        if row["lost_reason"] is not None:
            assert row["lost_reason"] == "evicted"
            assert row["matched_tokens"] - row["reported_cached_tokens"] == row["lost_tokens"]
        assert re.search(r"[0-9a-f]{4}-[0-9a-f]{4}-", row["diverge_ours"]), row
    reasons = body["miss_reasons"]
    assert reasons["adds_up"] and reasons["requests"] == 6
    assert reasons["reasons"]["diverged"]["requests"] == 5
    assert reasons["reasons"]["cold"]["requests"] == 1
    (site,) = body["misses"]
    assert site["place"] == "system prompt" and site["requests"] == 5
    assert site["tokens_lost"] == sum(r["miss_tokens"] for r in table[1:])
    ours, theirs = site["examples"][0]["ours_marked"], site["examples"][0]["theirs_marked"]
    assert "[" in ours and "[" in theirs and ours != theirs
    advice = site["advice"]
    assert advice["kind"] == "uuid", json.dumps(advice)
    rule = advice["rule"]
    assert rule["scope"] == "messages" and rule["replacement"] == "<uuid>"
    assert "Session id: " in rule["pattern"]
    # Applied as config.yaml would: to the message's own text, before rendering.
    from kvern.config import NormalizationRule
    from kvern.prompt.normalize import Normalizer

    norm = Normalizer.from_rules([NormalizationRule.model_validate(rule)])
    assert norm.text(SYSTEM.format(sid=uuid.uuid4())) == SYSTEM.format(sid="<uuid>")
    measured = advice["measured"]
    assert measured["saved_tokens"] > 0 and not measured["merges_beyond_span"]
    assert measured["recovered_share"] >= 0.95
    # The rule pasted into the config: kvern's own normalizer, the same prompts.
    assert re.sub(rule["pattern"], "<uuid>", SYSTEM.format(sid=uuid.uuid4())) == SYSTEM.format(
        sid="<uuid>"
    )
    assert total(m, "kvern_cache_miss_reasons_total", reason="diverged") == 5
    assert total(m, "kvern_cache_miss_tokens_total", reason="diverged") == site["tokens_lost"]
