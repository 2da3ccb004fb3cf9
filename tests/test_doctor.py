"""``kvern doctor`` against real set-ups: a real llama-server, real tokenizers, real faults.

The upstream is llama.cpp's own server on the tiny Qwen2 GGUF of
``tests/llama_server.py`` (the real Qwen2 vocabulary and Qwen2.5 template),
served as ``tiny``; kvern's tokenizer for it is the one derived from the same
vocabulary (``tests/assets.py``), which llama-server's C++ tokenizer and
Jinja engine agree with on parity's samples. Each fault of the broken set-up
is a real one: a port nobody listens on, a hub id with no hub, a chat
template that differs from the one the server runs, a db path kvern cannot
create. The two end-to-end runs are ``python -m kvern doctor`` subprocesses,
as an operator runs it; the checks of one part run in-process.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvern.__main__ import exposure_warning, main
from kvern.analytics.schema import SCHEMA_VERSION
from kvern.config import AnalyticsConfig, parse_config
from kvern.doctor.local_checks import (
    LOW_FREE_BYTES,
    check_analytics,
    check_exposure,
    check_port,
)
from kvern.doctor.report import Check, Progress, Report, fail, ok, warn
from kvern.doctor.tokenizer_checks import check_hub
from kvern.tokenize.hub import HubProbe
from tests import assets
from tests.llama_server import llama_server, tiny_model
from tests.servers import blackhole, free_port, serve
from tests.test_parity import WRONG_CHATML  # a template override that makes figures wrong

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"
HUB_ID = "meta-llama/Llama-3.2-1B-Instruct"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """llama-server serving the tiny Qwen2 model as ``tiny``; its URL without /v1."""
    with llama_server(tiny_model("qwen2"), extra=("--alias", MODEL)) as url:
        yield url


def qwen2_dir() -> str:
    return str(assets.tokenizer_fixture("qwen2").directory)


def good_config(tmp_path: Path, server: str) -> dict[str, Any]:
    return {
        "upstream": {"base_url": server + "/v1"},
        "tokenizers": {"models": {MODEL: qwen2_dir()}},
        "analytics": {"db_path": str(tmp_path / "kvern.db")},
        "proxy": {"port": free_port()},
    }


def write_config(tmp_path: Path, data: dict[str, Any], name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def doctor_process(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m kvern doctor --config PATH``, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "kvern", "doctor", "--config", str(config), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )


def doctor(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    """The same, in this process: (exit status, stdout, stderr)."""
    code = main(["doctor", "--config", str(config), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def lines_of(out: str, symbol: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(symbol + " ")]


def lines_about(out: str, subject: str) -> list[str]:
    """The check lines about ``subject`` (the text between the symbol and ": ")."""
    return [line for line in out.splitlines() if line[2:].startswith(subject + ":")]


def line_about(out: str, subject: str) -> str:
    """The one check line about ``subject``."""
    found = lines_about(out, subject)
    assert len(found) == 1, f"expected one line about {subject!r} in:\n{out}"
    return found[0]


# -- end to end, as an operator runs it ---------------------------------------


def test_a_good_setup_passes_every_check_and_exits_0(tmp_path: Path, server: str) -> None:
    config = write_config(tmp_path, good_config(tmp_path, server))
    result = doctor_process(config)
    assert result.returncode == 0, result.stdout + result.stderr
    up = server.removeprefix("http://")
    # A machine short of disk gets a warning about it, and still passes.
    disk = "✓" if shutil.disk_usage(tmp_path).free >= LOW_FREE_BYTES else "!"
    checks = [line for line in result.stdout.splitlines() if not line.startswith("kvern doctor:")]
    assert [line.split(":")[0] for line in checks] == [
        f"✓ config {config}",
        "✓ analytics db",
        f"{disk} disk",
        "✓ tenant secret",
        "✓ port 127.0.0.1",
        "✓ admin key",
        f"✓ upstream {up.split(':')[0]}",  # "upstream 127.0.0.1:PORT: ..."
        f"✓ upstream {up.split(':')[0]}",
        "✓ tokenizer hub",
        f"✓ tokenizer for {MODEL}",
        f"✓ parity of {MODEL} with 127.0.0.1",
        "✓ shared state",
        "✓ kv events",
        f"✓ upstream {up.split(':')[0]}",
    ]
    out = result.stdout
    assert lines_about(out, f"upstream {up}")[0].endswith(f"; models: {MODEL}")
    assert "llama.cpp's server (from /props)" in out and "cache model llamacpp slots 1" in out
    assert f"exact ({qwen2_dir()}, 151936 tokens" in line_about(out, f"tokenizer for {MODEL}")
    assert "template and tokens match (llamacpp" in line_about(out, f"parity of {MODEL} with {up}")
    cached = line_about(out, f"upstream {up} cached tokens")
    assert "reports cached tokens in usage.prompt_tokens_details.cached_tokens" in cached
    oks, warnings = (14, 0) if disk == "✓" else (13, 1)
    assert out.splitlines()[-1] == f"kvern doctor: {oks} ok, {warnings} warning(s), 0 failure(s)"
    # Progress of the long steps on stderr: what, then how long it took.
    assert f"loading tokenizer for {MODEL} from {qwen2_dir()} ..." in result.stderr
    assert f"  loading tokenizer for {MODEL} from {qwen2_dir()}: " in result.stderr
    assert not (tmp_path / "kvern.db").exists()  # the doctor leaves nothing behind


def test_a_broken_setup_finds_each_fault_and_exits_1(tmp_path: Path, server: str) -> None:
    """Unreachable upstream, a tokenizer that cannot load offline, parity, a db kvern cannot make.

    The db: tests run as root, and a chmod 0500 folder does not stop root. A
    path *through a regular file* stops everyone (ENOTDIR), as a typo in a
    mount path does; the sysfs case below is one more that stops root.
    """
    template = tmp_path / "override.jinja"
    template.write_text(WRONG_CHATML, encoding="utf-8")
    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("a file where the db's folder should be\n", encoding="utf-8")
    down = free_port()  # nobody listens there
    data = {
        "upstreams": [
            {"name": "good", "url": server + "/v1"},
            {"name": "down", "url": f"http://kvern:s3cret@127.0.0.1:{down}/v1"},
        ],
        "tokenizers": {
            "models": {
                MODEL: {"source": qwen2_dir(), "chat_template": str(template)},
                "llama3.2": HUB_ID,  # no hub here, not in the local cache
            }
        },
        "analytics": {"db_path": str(not_a_folder / "kvern.db")},
        "proxy": {"host": "0.0.0.0", "port": free_port()},
    }
    result = doctor_process(write_config(tmp_path, data))
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "s3cret" not in out + result.stderr

    unreachable = line_about(out, "upstream down")
    assert unreachable.startswith("✗ ")
    assert f"http://***@127.0.0.1:{down}/v1 unreachable: cannot connect" in unreachable
    assert unreachable.endswith("→ start the backend, or correct upstreams[1].url")

    fallback = line_about(out, "tokenizer for llama3.2")
    assert fallback.startswith("✗ ") and f"loading '{HUB_ID}' failed: OSError" in fallback
    # What kvern would do instead, asked of the first upstream (llama-server can tokenize).
    assert "kvern would ask upstream good to tokenize instead (llamacpp API" in fallback
    assert "→ download meta-llama/Llama-3.2-1B-Instruct into the HF cache" in fallback

    parity = line_about(out, f"parity of {MODEL} with good")
    assert parity.startswith("✗ parity of tiny with good: MISMATCH: template differs in sample 1")
    assert "You are a helpful assistant." in parity and "You are Qwen, created by" in parity
    assert f"→ set tokenizers.models.{MODEL}.chat_template to the template its GGUF" in parity

    db = line_about(out, "analytics db")
    assert db == (
        f"✗ analytics db: {not_a_folder / 'kvern.db'}: {not_a_folder} is not a folder "
        "→ point analytics.db_path at a writable folder"
    )
    exposed = line_about(out, "admin key")
    assert exposed.startswith("! admin key: listening on 0.0.0.0 with no admin key")
    assert exposed.endswith("→ set proxy.admin_api_key or KVERN_ADMIN_KEY")
    # The good upstream and the good tokenizer still pass.
    assert lines_about(out, "upstream good")[0].startswith("✓ ")
    assert line_about(out, f"tokenizer for {MODEL}").startswith("✓ ")
    # Every line that is not ✓ says what to do.
    assert all(" → " in line for line in lines_of(out, "✗") + lines_of(out, "!"))
    assert out.splitlines()[-1].endswith(f"{len(lines_of(out, '✗'))} failure(s)")


def test_an_invalid_config_exits_2_naming_each_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("trie:\n  block_size: -1\nproxy:\n  prot: 8080\n", encoding="utf-8")
    result = doctor_process(bad)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    failures = lines_of(result.stdout, "✗")
    assert len(failures) == 2
    assert failures[0].startswith(f"✗ config {bad}: proxy.prot: unknown key")
    assert failures[1].startswith(f"✗ config {bad}: trie.block_size: got -1; expected:")
    assert all(
        line.endswith(f"→ correct it in {bad}; kvern serve refuses to start until it is")
        for line in failures
    )


# -- the analytics db, for real (tests run as root) ---------------------------


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="no sysfs on this machine")
def test_a_db_in_sysfs_is_refused_even_to_root() -> None:
    """sysfs takes no new files from anyone: a folder that really is read-only to root."""
    (check,) = check_analytics(AnalyticsConfig(db_path="/sys/kvern.db"))  # type: ignore[call-arg]
    assert check.status == "fail"
    assert check.message.startswith("/sys/kvern.db: cannot create files in /sys (")
    assert check.fix == "point analytics.db_path at a writable folder"


def test_a_db_whose_folder_is_missing_names_the_mkdir(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "kvern.db"
    (check,) = check_analytics(AnalyticsConfig(db_path=str(path)))  # type: ignore[call-arg]
    assert (check.status, check.fix) == ("fail", f"mkdir -p {path.parent}")


def make_db(path: Path, version: int) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()


def test_an_existing_db_is_checked_without_being_changed(tmp_path: Path) -> None:
    db = tmp_path / "kvern.db"
    make_db(db, SCHEMA_VERSION)
    secret = tmp_path / "kvern.db.tenant-secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n", encoding="utf-8")
    secret.chmod(0o600)
    before = hashlib.sha256(db.read_bytes()).hexdigest(), sorted(os.listdir(tmp_path))
    checks = check_analytics(AnalyticsConfig(db_path=str(db)))  # type: ignore[call-arg]
    assert [c.status for c in checks] == ["ok", "ok", "ok"]
    assert checks[0].message == f"{db}: writable, schema v{SCHEMA_VERSION}"
    assert checks[2].message == f"{secret}: present, mode 0600"
    assert (hashlib.sha256(db.read_bytes()).hexdigest(), sorted(os.listdir(tmp_path))) == before


def test_a_db_of_a_newer_kvern_or_not_sqlite_fails(tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    make_db(newer, SCHEMA_VERSION + 1)
    (check,) = check_analytics(AnalyticsConfig(db_path=str(newer)))  # type: ignore[call-arg]
    assert check.status == "fail" and f"schema version {SCHEMA_VERSION + 1}, newer" in check.message
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all, just some bytes " * 100)
    (check,) = check_analytics(AnalyticsConfig(db_path=str(junk)))  # type: ignore[call-arg]
    assert check.status == "fail" and "not writable" in check.message
    assert "file is not a database" in check.message


def test_a_missing_tenant_secret_beside_an_existing_db_is_a_warning(tmp_path: Path) -> None:
    db = tmp_path / "kvern.db"
    make_db(db, SCHEMA_VERSION)
    checks = check_analytics(AnalyticsConfig(db_path=str(db)))  # type: ignore[call-arg]
    assert checks[-1].status == "warn"
    assert "tenant ids in the db stop matching new ones" in checks[-1].message


# -- port, admin key, hub -----------------------------------------------------


def test_a_port_in_use_fails_and_a_free_one_passes() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        check = check_port("127.0.0.1", port)
    assert check.status == "fail" and check.message.startswith("in use")
    assert f"sport = :{port}" in (check.fix or "")
    assert check_port("127.0.0.1", free_port()).status == "ok"


@pytest.mark.parametrize(
    ("host", "key", "status"),
    [
        ("127.0.0.1", None, "ok"),
        ("localhost", None, "ok"),
        ("0.0.0.0", None, "warn"),
        ("", None, "warn"),
        ("0.0.0.0", "a-long-admin-key", "ok"),
    ],
)
def test_an_admin_key_is_needed_only_beyond_loopback(
    host: str, key: str | None, status: str
) -> None:
    config = parse_config({"proxy": {"host": host, "admin_api_key": key}})
    check = check_exposure(config, exposure_warning)
    assert check.status == status
    if status == "warn":
        assert "decoded prompt prefixes" in check.message
        assert check.fix == "set proxy.admin_api_key or KVERN_ADMIN_KEY"


def test_an_unreachable_hub_warns_only_when_a_source_is_a_hub_id() -> None:
    progress = Progress(io.StringIO())
    dead = HubProbe(endpoint=f"http://127.0.0.1:{free_port()}", offline=False, timeout_s=2.0)
    with_hub_id = parse_config({"tokenizers": {"models": {"m": HUB_ID}}})
    check = check_hub(with_hub_id, dead, progress)
    assert check.status == "warn" and "unreachable" in check.message and HUB_ID in check.message
    assert check.fix is not None and "HF_HUB_OFFLINE=1" in check.fix
    local_only = parse_config({"tokenizers": {"models": {"m": qwen2_dir()}}})
    never_asked = HubProbe(endpoint="http://never-asked.invalid", offline=False)
    assert check_hub(local_only, never_asked, progress).status == "ok"
    assert never_asked.status().state == "unchecked"


# -- the upstream: requests, cache model, models without a tokenizer ----------


def test_no_requests_sends_no_chat_and_says_so(
    tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, good_config(tmp_path, server))
    code, out, err = doctor(capsys, config, "--no-requests")
    assert code == 0
    up = server.removeprefix("http://")
    assert line_about(out, f"upstream {up} cached tokens") == (
        f"! upstream {up} cached tokens: not checked (--no-requests) "
        "→ run without --no-requests to send two 1-token requests"
    )
    assert "sending 2 one-token requests" not in err


@pytest.mark.parametrize(
    ("cache_model", "said"),
    [
        (
            {"kind": "radix"},
            "kvern will model a radix cache, but llama.cpp's server caches as llamacpp "
            "→ set upstream.cache_model.kind: llamacpp (or auto)",
        ),
        (
            {"kind": "llamacpp", "slots": 3},
            "kvern will model 3 slot(s), but the upstream has 1 slot(s): its predicted cached "
            "tokens will be off → set upstream.cache_model.slots: 1",
        ),
    ],
)
def test_a_cache_model_that_contradicts_the_backend_is_a_warning(
    tmp_path: Path,
    server: str,
    capsys: pytest.CaptureFixture[str],
    cache_model: dict[str, Any],
    said: str,
) -> None:
    data = good_config(tmp_path, server)
    data["upstream"]["cache_model"] = cache_model
    code, out, _ = doctor(capsys, write_config(tmp_path, data), "--no-requests")
    assert code == 0
    warnings = [line for line in lines_of(out, "!") if "kvern will model" in line]
    assert warnings == [f"! upstream {server.removeprefix('http://')}: {said}"]


def test_a_listed_model_without_a_tokenizer_warns_and_strict_fails_on_it(
    tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = good_config(tmp_path, server)
    del data["tokenizers"]
    config = write_config(tmp_path, data)
    code, out, _ = doctor(capsys, config)
    assert code == 0
    line = line_about(out, f"tokenizer for {MODEL}")
    assert line.startswith(f"! tokenizer for {MODEL}: listed by upstream ")
    assert "kvern would ask upstream" in line and "to tokenize instead (llamacpp API" in line
    assert line.endswith(
        f"→ map '{MODEL}' in tokenizers.models (a local directory, a .gguf "
        "file, or source: upstream)"
    )
    strict, _, _ = doctor(capsys, config, "--strict", "--no-requests")
    assert strict == 1


def test_a_glob_key_is_checked_under_a_name_the_upstream_lists(
    tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = good_config(tmp_path, server)
    data["tokenizers"] = {"models": {"ti*": qwen2_dir()}}
    code, out, _ = doctor(capsys, write_config(tmp_path, data), "--no-requests")
    assert code == 0
    assert line_about(out, f"tokenizer for {MODEL}").startswith("✓ ")
    assert line_about(out, f"parity of {MODEL} with {server.removeprefix('http://')}").startswith(
        "✓ "
    )


def test_a_backend_that_reports_no_cached_tokens_gets_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An OpenAI-compatible backend of no known kind whose usage carries no cached figure."""
    seen: list[dict[str, Any]] = []

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "m"}]})

    async def chat(request: Request) -> Response:
        seen.append(await request.json())
        usage = {"prompt_tokens": 300, "completion_tokens": 1, "total_tokens": 301}
        choice = {"index": 0, "message": {"role": "assistant", "content": "OK"}}
        return JSONResponse({"choices": [{**choice, "finish_reason": "length"}], "usage": usage})

    app = Starlette(
        routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])]
    )
    with serve(app) as url:
        data = {
            "upstream": {"base_url": url + "/v1"},
            "analytics": {"enabled": False},
            "proxy": {"port": free_port()},
        }
        code, out, _ = doctor(capsys, write_config(tmp_path, data))
    assert code == 0
    up = url.removeprefix("http://")
    assert lines_about(out, f"upstream {up}")[0].startswith("✓ ")
    kind = [line for line in out.splitlines() if "did not say what it is" in line]
    assert len(kind) == 1 and kind[0].startswith("! ")
    cached = line_about(out, f"upstream {up} cached tokens")
    assert cached.startswith(f"! upstream {up} cached tokens: its answers for m carry no cached")
    assert "counted as unreported" in cached
    # Twice the same chat, one token each, over two KV blocks of the default size.
    assert len(seen) == 2 and seen[0] == seen[1] and seen[0]["max_tokens"] == 1
    assert len(seen[0]["messages"][0]["content"].split()) >= 256


def test_a_wrong_tokenizer_is_told_the_server_s_own_gguf_and_that_fix_passes(
    tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Llama 3's tokenizer in front of a Qwen2 server: both template and ids differ.

    The fix names the .gguf llama-server loaded (its /props ``model_path``,
    present on this machine); kvern rebuilds the tokenizer and template from
    it, and the same check then passes.
    """
    data = good_config(tmp_path, server)
    data["tokenizers"] = {"models": {MODEL: str(assets.tokenizer_fixture("llama3").directory)}}
    code, out, _ = doctor(capsys, write_config(tmp_path, data), "--no-requests")
    assert code == 1
    up = server.removeprefix("http://")
    parity = line_about(out, f"parity of {MODEL} with {up}")
    assert parity.startswith(f"✗ parity of {MODEL} with {up}: MISMATCH: template differs")
    served = tiny_model("qwen2")
    assert parity.endswith(
        f"→ set tokenizers.models.{MODEL}.source to the backend's own tokenizer "
        f"(its .gguf file: {served}): template and tokens differ"
    )
    data["tokenizers"] = {"models": {MODEL: str(served)}}
    code, out, _ = doctor(capsys, write_config(tmp_path, data), "--no-requests")
    assert code == 0
    assert line_about(out, f"parity of {MODEL} with {up}") == (
        f"✓ parity of {MODEL} with {up}: template and tokens match (llamacpp, 3 sample chats)"
    )


def test_source_upstream_is_exact_when_the_upstream_tokenizes(
    tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = good_config(tmp_path, server)
    data["tokenizers"] = {"models": {MODEL: "upstream"}}
    code, out, _ = doctor(capsys, write_config(tmp_path, data), "--no-requests")
    assert code == 0
    up = server.removeprefix("http://")
    assert line_about(out, f"tokenizer for {MODEL}") == (
        f"✓ tokenizer for {MODEL}: source: upstream: exact, tokenized by upstream {up} "
        "(llamacpp API, 2 requests per tracked request)"
    )
    assert line_about(out, "tokenizer hub").startswith("✓ tokenizer hub: not needed")


def test_an_upstream_that_accepts_but_never_answers_is_down_by_kvern_s_health_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with blackhole() as url:
        data = {
            "upstream": {"base_url": url + "/v1"},
            "routing": {"health": {"timeout_s": 0.5}},
            "analytics": {"enabled": False},
            "proxy": {"port": free_port()},
        }
        code, out, _ = doctor(capsys, write_config(tmp_path, data))
    assert code == 1
    line = line_about(out, f"upstream {url.removeprefix('http://')}")
    assert line.startswith("✗ ") and "did not answer GET /models within 0.5 s" in line
    assert line.endswith("→ see why it is slow, or raise routing.health.timeout_s")


# -- the report itself ---------------------------------------------------------


def test_a_check_that_raises_is_a_failure_line_and_the_run_goes_on() -> None:
    out = io.StringIO()
    report = Report(out)
    with report.guard("upstreams"):
        raise RuntimeError("surprise\nacross lines")
    report.add(ok("next", "still checked"))
    assert out.getvalue().splitlines() == [
        "✗ upstreams: the check itself failed: RuntimeError: surprise across lines "
        "→ rerun with --verbose and report it as a kvern bug",
        "✓ next: still checked",
    ]


def test_every_line_that_is_not_ok_needs_a_fix() -> None:
    with pytest.raises(AssertionError):
        Check("warn", "x", "degraded")
    out = io.StringIO()
    report = Report(out)
    report.extend([ok("a", "fine"), warn("b", "slow", "speed it up"), fail("c", "down", "start")])
    assert out.getvalue().splitlines() == [
        "✓ a: fine",
        "! b: slow → speed it up",
        "✗ c: down → start",
    ]
    assert (report.exit_code(), report.exit_code(strict=True)) == (1, 1)
    assert Report(io.StringIO(), [ok("a", "fine"), warn("b", "w", "f")]).exit_code(strict=True) == 1


def test_a_stream_that_cannot_print_symbols_gets_ascii() -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    Report(stream).add(fail("c", "down – really", "start it"))
    stream.flush()
    assert raw.getvalue().decode("ascii") == "x c: down ? really -> start it\n"


def test_a_long_step_says_it_is_still_running_then_how_long_it_took() -> None:
    err = io.StringIO()
    with Progress(err, heartbeat_s=0.05).step("loading tokenizer for m"):
        time.sleep(0.18)
    said = err.getvalue().splitlines()
    assert said[0] == "loading tokenizer for m ..."
    assert said[1].startswith("  ... still loading tokenizer for m (")
    assert said[-1].startswith("  loading tokenizer for m: ") and said[-1].endswith(" s")


def test_doctor_help_lists_its_switches() -> None:
    parser = argparse.ArgumentParser()
    from kvern.doctor.cli import add_arguments

    add_arguments(parser)
    text = parser.format_help()
    for switch in ("--config", "--no-requests", "--strict", "--timeout-s", "--api-key"):
        assert switch in text


# -- a real vLLM started without --enable-prompt-tokens-details ---------------


def test_vllm_without_prompt_token_details_is_told_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """vLLM reports cached tokens only with --enable-prompt-tokens-details; it says nothing else.

    One real vLLM (about a minute to start, 4 GiB) with that flag turned off
    again (its flags are ``BooleanOptionalAction``: the later ``--no-`` wins).
    """
    from tests.vllm_server import (
        SERVED_MODEL,
        VllmUnavailable,
        install_vllm,
        tiny_model_dir,
        vllm_server,
    )

    try:
        install_vllm()
        model_dir = tiny_model_dir()
    except VllmUnavailable as exc:
        pytest.skip(f"no real vLLM here: {exc}")
    with vllm_server(block_size=32, extra=("--no-enable-prompt-tokens-details",)) as url:
        data = {
            "upstream": {"base_url": url + "/v1"},
            "tokenizers": {"models": {SERVED_MODEL: str(model_dir)}},
            "analytics": {"db_path": str(tmp_path / "kvern.db")},
            "proxy": {"port": free_port()},
        }
        code, out, _ = doctor(capsys, write_config(tmp_path, data))
    assert code == 0, out
    up = url.removeprefix("http://")
    kind = lines_about(out, f"upstream {up}")[1]
    assert kind.startswith(f"✓ upstream {up}: vLLM (from /metrics vllm:cache_config_info)")
    assert "block 32" in kind
    parity = line_about(out, f"parity of {SERVED_MODEL} with {up}")
    assert parity == f"✓ parity of {SERVED_MODEL} with {up}: tokens match (vllm, 3 sample chats)"
    assert line_about(out, f"upstream {up} cached tokens") == (
        f"! upstream {up} cached tokens: its answers for {SERVED_MODEL} carry no cached-token "
        "figure: kvern's predictions for it are counted as unreported, never checked "
        "→ restart vLLM with --enable-prompt-tokens-details"
    )
