"""Truth: kvern in front of ``kvern engine`` predicts the engine's cached tokens exactly.

openai client -> kvern (``cache_model.kind: auto``) -> the engine serving the
real SmolLM2-135M-Instruct. kvern detects the engine from its ``/metrics``,
takes its block size and models its store with the ``radix`` rules; the
engine reports in ``usage.prompt_tokens_details.cached_tokens`` what it
reused. A multi-tenant trace -- tenants sharing a preamble, sessions
re-sending their history with the model's own greedy answers, turns of
different sessions interleaved -- must agree request by request.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("torch", reason="the engine extra (torch) is not installed")

from kvern.app import create_app  # noqa: E402
from kvern.config import parse_config  # noqa: E402
from kvern.engine.app import create_engine_app  # noqa: E402
from kvern.engine.service import EngineService, EngineSettings  # noqa: E402
from tests.engine_model import NAME, smollm2  # noqa: E402
from tests.servers import serve  # noqa: E402
from tests.truth import chat, client_for, flush, rows, stream_chat  # noqa: E402

pytestmark = pytest.mark.slow

PREAMBLE = "You answer for Example Corp's help desk. Be brief and correct. " * 3
TENANTS = {
    "acme": "Tenant Acme sells anvils and rockets.",
    "globex": "Tenant Globex sells software licences and support plans.",
    "initech": "Tenant Initech sells printers, staplers and paper.",
}
QUESTIONS = ["What do you sell?", "Is there a discount?", "How do I order?"]


@pytest.fixture(scope="module")
def engine() -> Iterator[str]:
    settings = EngineSettings(model="unused", served_name=NAME, cache_dir=Path("unused"))
    with serve(create_engine_app(EngineService(settings, loaded=smollm2()))) as url:
        yield url


def test_predicted_equals_reported_on_every_request_of_a_multi_tenant_trace(
    tmp_path: Path, engine: str
) -> None:
    config = parse_config(
        {
            "upstream": {"base_url": engine + "/v1", "cache_model": {"kind": "auto"}},
            "tokenizers": {"models": {NAME: str(smollm2().folder)}},
            "trie": {"min_prefix_tokens": 1},
            "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 10},
        }
    )
    with serve(create_app(config)) as kvern:
        client = client_for(kvern)
        sessions = [
            (tenant, s, [{"role": "system", "content": PREAMBLE + rules}])
            for tenant, rules in TENANTS.items()
            for s in range(2)
        ]
        for turn, question in enumerate(QUESTIONS):
            for i, (_tenant, s, messages) in enumerate(sessions):
                messages.append({"role": "user", "content": f"{question} (session {s})"})
                send = stream_chat if (i + turn) % 2 else chat
                answer = send(client, NAME, messages, max_tokens=10)
                messages.append({"role": "assistant", "content": answer})
        flush(kvern)
        health = httpx.get(kvern + "/health", timeout=30).json()
    table = rows(tmp_path / "kvern.db")
    assert len(table) == len(QUESTIONS) * len(sessions)
    for row in table:
        assert row["reported_cached_source"] == "usage.prompt_tokens_details.cached_tokens"
    predicted = [r["predicted_cached_tokens"] for r in table]
    reported = [r["reported_cached_tokens"] for r in table]
    assert predicted == reported, list(zip(predicted, reported, strict=True))
    assert sum(reported) > 0.5 * sum(r["prompt_tokens"] for r in table)  # the engine did reuse
    assert "kvern_engine" in str(health)
