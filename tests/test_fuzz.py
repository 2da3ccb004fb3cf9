"""Fuzzing over real HTTP: whatever a client sends, kvern never answers 5xx itself,
never logs a traceback, and writes a row for every request it forwards.

Hypothesis draws request bodies (raw bytes, and JSON shaped like the
OpenAI and Ollama APIs with hostile values: lone surrogates, huge integers,
deep nesting, wrong types), header values (any octet HTTP allows) and query
strings. The upstream answers 200 to everything without looking, so any 5xx
is kvern's own; it counts what it receives, which is what must have rows.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvern.app import create_app
from kvern.config import parse_config
from tests.raw_upstream import CHAT as CANNED
from tests.servers import serve

PATHS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/api/chat",
    "/api/generate",
    "/v1/embeddings",
    "/v1/models",
]


@contextmanager
def counting_upstream() -> Iterator[tuple[str, list[str]]]:
    """Answers 200 with a canned completion to any request; lists each path it received."""
    received: list[str] = []

    async def anything(request: Request) -> Response:
        await request.body()
        received.append(request.url.path)
        return JSONResponse(CANNED)

    app = Starlette(
        routes=[Route("/{path:path}", anything, methods=["GET", "POST", "PUT", "DELETE"])]
    )
    with serve(app) as url:
        yield url, received


class Problems(logging.Handler):
    """Collects every record that carries a traceback or is an error."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)


hostile_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["m\ud800", "\udfff", "\x00", "é" * 3, "🙂", "a" * 5000]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    hostile_text,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["system", "user", "assistant", "tool", "x"]),
                "content": st.one_of(hostile_text, json_values),
            }
        ),
        json_values,
    ),
    max_size=4,
)
api_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.sampled_from(["sim", "m\ud800", ""]), json_values),
        "messages": st.one_of(messages, json_values),
        "prompt": st.one_of(hostile_text, json_values),
        "stream": st.one_of(st.booleans(), st.sampled_from(["false", "true", 1, None])),
        "user": st.one_of(hostile_text, json_values),
        "tools": json_values,
        "max_tokens": st.integers(min_value=-(2**70), max_value=2**70),
    },
)


def encode(body: Any, ascii_only: bool) -> bytes:
    return json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(encode, api_bodies, st.booleans()),
    st.builds(
        lambda depth: b'{"model": "sim", "x": ' + b"[" * depth + b"]" * depth + b"}",
        st.integers(min_value=900, max_value=3000),
    ),
)
header_names = st.text(string.ascii_lowercase + "-", min_size=1, max_size=12).filter(
    lambda n: (
        n
        not in {
            "content-length",
            "transfer-encoding",
            "host",
            "connection",
            "expect",
            "content-encoding",
            "upgrade",
            "te",
            "trailer",
        }
    )
)
# Any octet HTTP allows in a value: visible ASCII, space, tab and obs-text.
header_values = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c == 9 or 32 <= c <= 126 or c >= 128).strip(b" \t")
)
headers = st.lists(st.tuples(header_names, header_values), max_size=4)
queries = st.dictionaries(st.text(max_size=8), st.text(max_size=12), max_size=3)


def forwarded_rows(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute("SELECT count(*) FROM requests").fetchone()[0])
    finally:
        con.close()


def test_no_input_makes_kvern_answer_5xx_log_a_traceback_or_skip_a_row(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    db = tmp_path / "kvern.db"
    problems = Problems()
    with counting_upstream() as (up, received):
        config = parse_config(
            {
                # Cache settings given, so kvern asks the upstream nothing of its
                # own: every request it receives is one kvern forwarded.
                "upstream": {
                    "base_url": up + "/v1",
                    "cache_model": {"kind": "radix", "block_size": 16},
                },
                "tokenizers": {
                    "models": {"*": str(tokenizer_fixtures["qwen2"].directory)},
                    "parity_check": False,
                },
                "analytics": {"db_path": str(db), "flush_interval_ms": 20},
                "routing": {"health": {"interval_s": 0}},
            }
        )
        with serve(create_app(config)) as url:
            watched = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "kvern")]
            for logger in watched:
                logger.addHandler(problems)
            client = httpx.Client(base_url=url, timeout=30)
            statuses: list[int] = []

            @settings(
                max_examples=250,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            )
            @given(
                path=st.sampled_from(PATHS),
                method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT"]),
                body=bodies,
                extra=headers,
                query=queries,
                ctype=st.sampled_from(["application/json", "text/plain", None]),
            )
            def one(
                path: str,
                method: str,
                body: bytes,
                extra: list[tuple[str, bytes]],
                query: dict[str, str],
                ctype: str | None,
            ) -> None:
                sent = [(k.encode(), v) for k, v in extra]
                if ctype is not None:
                    sent.append((b"content-type", ctype.encode()))
                target = path + ("?" + urlencode(query) if query else "")
                response = client.request(method, target, content=body, headers=sent)
                statuses.append(response.status_code)
                assert response.status_code < 500, (response.status_code, response.text[:300])
                if response.status_code >= 400 and "x-kvern-upstream" not in response.headers:
                    error = response.json()["error"]  # kvern's own: OpenAI-shaped
                    assert set(error) == {"message", "type", "param", "code"}

            try:
                one()
            finally:
                client.close()
                for logger in watched:
                    logger.removeHandler(problems)
    assert not problems.records, [problems.format(r) for r in problems.records[:3]]
    assert len(statuses) >= 100
    # Every request the upstream received is one kvern forwarded: each has its row.
    assert forwarded_rows(db) == len(received)
