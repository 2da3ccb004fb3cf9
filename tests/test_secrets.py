"""Credentials in an upstream URL or a query string never show; tenant ids are keyed.

Each test fails on the kvern before issue 12 (defect 3): the password of
``http://user:pass@host/v1`` appeared in the ``x-kvern-upstream`` header,
502 bodies, /health, /analytics and the db; query-string keys appeared in
access-log lines; tenant ids were an unkeyed sha256 anyone could recompute.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kvern.analytics.tenant_secret import secret_path, tenant_secret
from kvern.app import create_app
from kvern.config import AnalyticsConfig, parse_config
from kvern.config.urls import redact_url
from kvern.prompt.tenants import TenantIds
from kvern.routes.access_log import RedactingFilter
from tests.raw_upstream import CHAT as CANNED
from tests.servers import free_port, serve, serve_chat

MODEL = "sim"
PASSWORD = "hunter2-very-secret"
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "hi"}],
    "user": "alice@example.com",
}


def config_for(base_url: str, db: Path, **extra: Any) -> Any:
    return parse_config(
        {
            "upstream": {"base_url": base_url, "connect_timeout_s": 2},
            "tokenizers": {"parity_check": False},
            "analytics": {"db_path": str(db), "flush_interval_ms": 20},
            "routing": {"health": {"interval_s": 0}},
            **extra,
        }
    )


def db_text(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return "\n".join(repr(r) for r in con.execute("SELECT * FROM requests"))
    finally:
        con.close()


def test_a_password_in_the_upstream_url_never_reaches_a_client_the_db_or_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen_auth: list[str] = []

    async def chat(request: Request) -> Response:
        await request.body()
        seen_auth.append(request.headers.get("authorization", ""))
        return JSONResponse(CANNED)

    db = tmp_path / "kvern.db"
    caplog.set_level(logging.DEBUG)
    with serve_chat(chat, MODEL) as up:
        host = up.removeprefix("http://")
        config = config_for(f"http://user:{PASSWORD}@{host}/v1", db)
        with serve(create_app(config)) as url:
            ok = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
            health = httpx.get(url + "/health", timeout=30)
            analytics = httpx.get(url + "/analytics", params={"wait_s": 20}, timeout=30)
    assert ok.status_code == 200
    assert ok.headers["x-kvern-upstream"] == host
    for text in (str(ok.headers), health.text, analytics.text, db_text(db), caplog.text):
        assert PASSWORD not in text
    assert host in health.text and "***@" in health.text
    assert seen_auth and seen_auth[0].startswith("Basic ")  # still sent to the upstream


def test_a_502_names_the_upstream_without_its_credentials(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    db = tmp_path / "kvern.db"
    config = config_for(f"http://admin:{PASSWORD}@127.0.0.1:{port}/v1", db)
    with serve(create_app(config)) as url:
        failed = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
        health = httpx.get(url + "/health", timeout=30)
        analytics = httpx.get(url + "/analytics", params={"wait_s": 20}, timeout=30)
    assert failed.status_code == 502
    error = failed.json()["error"]
    assert f"127.0.0.1:{port}" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    for text in (failed.text, health.text, analytics.text, db_text(db)):
        assert PASSWORD not in text and "admin:" not in text


def test_redacted_urls_keep_host_and_path_and_hide_secret_query_values() -> None:
    shown = redact_url("https://u:p@api.example.com:8443/v1?api-key=sk-123&deployment=gpt")
    assert shown == "https://***@api.example.com:8443/v1?api-key=***&deployment=gpt"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


def test_access_log_lines_hide_api_keys_sent_in_the_query_string() -> None:
    # The record uvicorn's access logger writes: (client, method, path, http version, status).
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5555", "GET", "/v1/models?api_key=sk-live-abc&limit=5", "1.1", 200),
        None,
    )
    assert RedactingFilter().filter(record)
    line = record.getMessage()
    assert "sk-live-abc" not in line
    assert "api_key=***" in line and "limit=5" in line


def test_tenant_ids_are_keyed_stable_and_not_a_plain_hash_of_the_user() -> None:
    a = TenantIds(b"a" * 32)
    b = TenantIds(b"b" * 32)
    body = {"user": "alice@example.com"}
    assert a.end_user(body) == a.end_user(dict(body)) != b.end_user(body)
    plain = hashlib.sha256(b"alice@example.com").hexdigest()[:16]
    assert a.end_user(body) != "user:" + plain
    assert a.tenant("Bearer sk-1") == a.tenant("sk-1") != a.tenant("Bearer sk-2")
    assert a.tenant("Bearer sk-1") != b.tenant("Bearer sk-1")
    assert a.end_user({"user": ""}) is None and a.tenant(None) is None


def test_the_tenant_secret_is_made_once_beside_the_db_and_kept_private(tmp_path: Path) -> None:
    config = AnalyticsConfig(db_path=str(tmp_path / "sub" / "kvern.db"))
    first = tenant_secret(config)
    again = tenant_secret(config)
    path = secret_path(config.db_path)
    assert first == again and len(first) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    configured = AnalyticsConfig(db_path=str(tmp_path / "k.db"), tenant_secret="x" * 20)
    assert tenant_secret(configured) == b"x" * 20


def test_tenant_ids_in_the_db_survive_a_restart(tmp_path: Path) -> None:
    async def chat(request: Request) -> Response:
        await request.body()
        return JSONResponse(CANNED)

    db = tmp_path / "kvern.db"
    tenants = []
    with serve_chat(chat, MODEL) as up:
        for _ in range(2):
            with serve(create_app(config_for(up + "/v1", db))) as url:
                assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30).is_success
            con = sqlite3.connect(db)
            rows = con.execute("SELECT end_user FROM requests ORDER BY rowid").fetchall()
            tenants.append(rows[-1][0])
            con.close()
    assert tenants[0] == tenants[1]
    assert tenants[0].startswith("user:")
    assert tenants[0] != "user:" + hashlib.sha256(b"alice@example.com").hexdigest()[:16]


ADMIN_KEY = "admin-key-for-tests"


def test_admin_pages_need_the_admin_key_and_bare_liveness_stays_open(tmp_path: Path) -> None:
    async def chat(request: Request) -> Response:
        await request.body()
        return JSONResponse(CANNED)

    with serve_chat(chat, MODEL) as up:
        config = config_for(up + "/v1", tmp_path / "kvern.db", proxy={"admin_api_key": ADMIN_KEY})
        with serve(create_app(config)) as url:
            # The proxy path is not guarded: the client's Authorization goes upstream.
            assert httpx.post(
                url + "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk"}
            ).is_success
            for path in ("/analytics", "/trie/visualize"):
                refused = httpx.get(url + path, timeout=30)
                assert refused.status_code == 401, path
                assert refused.json()["error"]["code"] == "admin_key_required"
                assert refused.headers["www-authenticate"].startswith("Bearer")
                wrong = httpx.get(url + path, headers={"x-kvern-admin-key": "nope"}, timeout=30)
                assert wrong.status_code == 401
            bearer = {"authorization": f"Bearer {ADMIN_KEY}"}
            header = {"x-kvern-admin-key": ADMIN_KEY}
            assert httpx.get(url + "/analytics", headers=bearer, timeout=30).status_code == 200
            assert httpx.get(url + "/trie/visualize", headers=header, timeout=30).status_code == 200
            bare = httpx.get(url + "/health", timeout=30)
            detailed = httpx.get(url + "/health", headers=bearer, timeout=30)
    assert bare.status_code == 200 and bare.json() == {"status": "ok"}
    assert "tracking" in detailed.json() and "upstream" in detailed.json()


def test_listening_beyond_loopback_without_an_admin_key_warns() -> None:
    from kvern.__main__ import exposure_warning

    def config(host: str, key: str | None = None) -> Any:
        return parse_config({"proxy": {"host": host, "admin_api_key": key}})

    assert exposure_warning(config("127.0.0.1")) is None
    assert exposure_warning(config("::1")) is None
    assert exposure_warning(config("localhost")) is None
    assert exposure_warning(config("0.0.0.0", ADMIN_KEY)) is None
    for host in ("0.0.0.0", "::", "10.1.2.3", "kvern.internal"):
        warning = exposure_warning(config(host))
        assert warning is not None and "admin_api_key" in warning


def test_the_admin_key_and_tenant_secret_come_from_the_environment() -> None:
    from kvern.config import load_config

    config = load_config(
        None, env={"KVERN_ADMIN_KEY": ADMIN_KEY, "KVERN_TENANT_SECRET": "s" * 24}
    )
    assert config.proxy.admin_api_key == ADMIN_KEY
    assert config.analytics.tenant_secret == "s" * 24
