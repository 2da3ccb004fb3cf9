"""``kvern engine`` over HTTP with the official openai client: the API, usage, sampling, errors."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("torch", reason="the engine extra (torch) is not installed")

import openai  # noqa: E402

from kvern.engine.app import create_engine_app  # noqa: E402
from kvern.engine.service import EngineService, EngineSettings  # noqa: E402
from tests.engine_model import NAME, smollm2  # noqa: E402
from tests.servers import serve  # noqa: E402

pytestmark = pytest.mark.slow

SYSTEM = "You are a helpful assistant of Example Corp. Keep every answer short. " * 4


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = EngineSettings(model="unused", served_name=NAME, cache_dir=Path("unused"))
    service = EngineService(settings, loaded=smollm2())
    with serve(create_engine_app(service)) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def ask(url: str, messages: list[dict[str, str]], **kw: object) -> openai.types.chat.ChatCompletion:
    return client(url).chat.completions.create(
        model=NAME, messages=messages, **({"temperature": 0, "max_tokens": 12} | kw)
    )


def test_a_second_chat_reports_the_shared_prefix_as_cached(engine: str) -> None:
    first = ask(engine, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}])
    second = ask(
        engine, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}]
    )
    assert first.choices[0].message.content
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and cached % 16 == 0 and cached >= 48
    assert cached < second.usage.prompt_tokens


def test_a_stream_carries_text_then_usage_when_asked(engine: str) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a fruit."}]
    plain = ask(engine, messages).choices[0].message.content
    stream = client(engine).chat.completions.create(
        model=NAME,
        messages=messages,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain  # streamed and whole answers agree (greedy)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_max_tokens_stop_and_seed_are_honoured(engine: str) -> None:
    messages = [{"role": "user", "content": "Count from one to twenty in words, commas between."}]
    capped = ask(engine, messages, max_tokens=3)
    assert capped.usage.completion_tokens == 3 and capped.choices[0].finish_reason == "length"
    full = ask(engine, messages, max_tokens=40).choices[0].message.content or ""
    assert "," in full
    stopped = ask(engine, messages, max_tokens=40, stop=[","])
    assert stopped.choices[0].message.content == full[: full.index(",")]
    assert stopped.choices[0].finish_reason == "stop"
    sampled = [
        ask(engine, messages, temperature=1.0, top_p=0.9, seed=s, max_tokens=16)
        .choices[0]
        .message.content
        for s in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1]  # one seed, one answer


def test_text_completions_and_token_id_prompts(engine: str) -> None:
    c = client(engine)
    answer = c.completions.create(
        model=NAME, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    ids = httpx.post(engine + "/tokenize", json={"prompt": "The capital of France is"}).json()
    again = c.completions.create(model=NAME, prompt=ids["tokens"], max_tokens=4, temperature=0)
    assert answer.choices[0].text == again.choices[0].text and answer.choices[0].text.strip()
    assert ids["count"] == answer.usage.prompt_tokens


def test_concurrent_requests_all_finish_and_interleave(engine: str) -> None:
    messages = [
        [{"role": "user", "content": f"Say a word about the number {i}."}] for i in range(4)
    ]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda m: ask(engine, m, max_tokens=8), messages))
    assert all(a.choices[0].message.content for a in answers)
    alone = ask(engine, messages[2], max_tokens=8)
    assert answers[2].choices[0].message.content == alone.choices[0].message.content


def test_models_health_metrics_and_tokenize(engine: str) -> None:
    models = client(engine).models.list().data
    assert [m.id for m in models] == [NAME] and models[0].owned_by == "kvern-engine"
    health = httpx.get(engine + "/health").json()
    assert health["status"] == "ok" and health["block_size"] == 16 and health["kv_bits"] == 16
    metrics = httpx.get(engine + "/metrics").text
    assert 'kvern_engine_cache_config_info{block_size="16"' in metrics
    assert "kvern_engine_cached_tokens_total" in metrics
    chat = httpx.post(engine + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert chat.json()["count"] == len(chat.json()["tokens"]) > 3


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b"[" * 100_000 + b"]" * 100_000, 400, None),
        (b'{"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}', 404, "model"),
        (b'{"messages": []}', 400, "messages"),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}',
            400,
            "max_tokens",
        ),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
            400,
            "temperature",
        ),
    ],
)
def test_bad_requests_get_an_openai_shaped_error(
    engine: str, body: bytes, status: int, param: str | None
) -> None:
    r = httpx.post(
        engine + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


def test_a_body_over_the_limit_is_refused_before_it_is_read(engine: str) -> None:
    """Declared or not, a body past 32 MiB gets the 400 without the engine holding it first."""
    import socket

    host, port = engine.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
            b"content-type: application/json\r\ncontent-length: 40000000\r\n\r\n{"
        )  # 40 MB declared, 1 byte sent: an answer now means nothing more was awaited
        head = sock.recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.1 400"), head
    assert '"code":"body_too_large"' in head.replace(" ", ""), head

    def chunks() -> Iterator[bytes]:  # undeclared: refused once the bytes pass the limit
        yield b'{"messages": "'
        for _ in range(40):
            yield b"x" * (1 << 20)

    try:
        r = httpx.post(engine + "/v1/chat/completions", content=chunks(), timeout=60)
    except httpx.WriteError:  # it answered and closed before the client finished sending
        return
    assert r.status_code == 400 and r.json()["error"]["code"] == "body_too_large"


def test_a_client_that_leaves_mid_stream_does_not_stall_the_next(engine: str) -> None:
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "stream": True,
        "max_tokens": 200,
    }
    with httpx.stream("POST", engine + "/v1/chat/completions", json=body, timeout=60) as r:
        for _ in r.iter_lines():
            break  # leave after the first line
    answer = ask(engine, [{"role": "user", "content": "Hi"}], max_tokens=4)
    assert answer.choices[0].message.content is not None
    running = httpx.get(engine + "/metrics").text
    assert "kvern_engine_requests_running 0.0" in running


# tgkill(2): a signal to one thread of another process (Python has no call for it).
_TGKILL = {"x86_64": 234, "aarch64": 131}


def _signal_a_thread_other_than_main(pid: int, signum: int) -> None:
    """SIGTERM as the kernel may deliver it: to any thread of the process, here not the main one."""
    import ctypes
    import os

    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert tids, "kvern engine runs HTTP on a thread of its own"
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(_TGKILL[platform.machine()], pid, tids[0], signum) == 0


@pytest.mark.skipif(platform.machine() not in _TGKILL, reason="tgkill's number is not known here")
def test_the_command_serves_from_the_main_thread_and_stops_on_sigterm_to_any_thread() -> None:
    """``kvern engine`` as users run it: its HTTP on a thread, the model on the main one.

    The SIGTERM goes to another thread: the kernel may pick any thread that does
    not block it, and the Python handler then waits for the main thread to run
    bytecode. CI saw a stop take over 30 s when the idle loop blocked forever.
    """
    import signal
    import sys

    from tests import assets
    from tests.servers import free_port, serving_process

    port = free_port()
    args = [
        sys.executable, "-m", "kvern", "engine", "--model", str(assets.smollm2_gguf()),
        "--served-model-name", "cli-model", "--port", str(port), "--threads", "2",
        "--cache-dir", str(assets.cache_root() / "engine"), "--log-level", "warning",
    ]  # fmt: skip
    with serving_process(args, port=port, name="engine", start_timeout_s=180) as (proc, url):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        first = c.chat.completions.create(model="cli-model", messages=messages, max_tokens=4)
        again = c.chat.completions.create(model="cli-model", messages=messages, max_tokens=4)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert again.usage.prompt_tokens_details.cached_tokens >= 48
        _signal_a_thread_other_than_main(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # a graceful stop, not a kill
