"""Parity of kvern's rendering and tokenization with the upstream's, against real llama-server.

llama-server runs the tiny GGUF models of ``tests/llama_server.py``: the real
Qwen2 and Llama 3 vocabularies and the real Qwen2.5 and Llama 3.2 templates,
rendered by llama.cpp's own Jinja engine and tokenized by its own C++
tokenizer, while kvern uses the HF tokenizers derived from the same files.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvern.analytics.parity_rows import ParityRow, latest_parity
from kvern.analytics.store import AnalyticsStore
from kvern.app import create_app
from kvern.config import KvernConfig, TokenizerEntry, TokenizersConfig, UpstreamConfig, parse_config
from kvern.parity.checker import ParityChecker, ParityReport, check_parity, default_samples, is_glob
from kvern.services import Services
from kvern.tokenize.model_tokenizer import ModelTokenizer
from kvern.tokenize.registry import TokenizerRegistry, load_hf_tokenizer
from kvern.upstream.client import Upstream
from tests import assets
from tests.fake_vllm import create_fake_vllm
from tests.llama_server import llama_server, tiny_model
from tests.servers import free_port, serve

pytestmark = pytest.mark.slow

# A ChatML template like Qwen2.5's but with another default system prompt.
WRONG_CHATML = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    """llama-server for each real tokenizer, started once for the module."""
    with ExitStack() as stack:
        yield {
            name: stack.enter_context(llama_server(tiny_model(name)))
            for name in ("qwen2", "llama3")
        }


def upstream_at(url: str) -> Upstream:
    return Upstream.from_config(UpstreamConfig(base_url=url + "/v1"))


TokenizerFor = Callable[..., ModelTokenizer]


@pytest.fixture(scope="module")
def tokenizer_for(hf_tokenizers: dict[str, Any]) -> TokenizerFor:
    """``tokenizer_for(name, chat_template=None)``: kvern's tokenizer for a fixture.

    Template overrides are loaded the way the registry loads them; each is
    loaded once per module (a load takes about a second).
    """
    loaded: dict[tuple[str, str | None], ModelTokenizer] = {}

    def get(name: str, chat_template: str | None = None) -> ModelTokenizer:
        key = (name, chat_template)
        if key not in loaded:
            source = str(assets.tokenizer_fixture(name).directory)
            hf = hf_tokenizers[name]
            if chat_template is not None:
                hf = load_hf_tokenizer(TokenizerEntry(source=source, chat_template=chat_template))
            loaded[key] = ModelTokenizer(hf, source=source)
        return loaded[key]

    return get


def nfc_samples() -> list[list[dict[str, Any]]]:
    """The default samples with every text in Unicode NFC."""
    return [
        [{**m, "content": unicodedata.normalize("NFC", m["content"])} for m in chat]
        for chat in default_samples()
    ]


async def check(url: str, tokenizer: ModelTokenizer, **kw: Any) -> ParityReport:
    async with httpx.AsyncClient() as client:
        return await check_parity(client, upstream_at(url), "tiny", tokenizer, **kw)


# -- real tokenizers against llama-server ------------------------------------


async def test_llama3_matches_llama_server(
    servers: dict[str, str], tokenizer_for: TokenizerFor
) -> None:
    report = await check(servers["llama3"], tokenizer_for("llama3"))
    assert report.to_dict() | {"checked_at_s": 0} == {
        "model": "tiny",
        "upstream": servers["llama3"].removeprefix("http://"),
        "method": "llamacpp",
        "status": "match",
        "template_match": True,
        "tokens_match": True,
        "first_diff": None,
        "checked_at_s": 0,
        "detail": None,
    }


async def test_qwen2_matches_llama_server_on_nfc_text(
    servers: dict[str, str], tokenizer_for: TokenizerFor
) -> None:
    report = await check(servers["qwen2"], tokenizer_for("qwen2"), samples=nfc_samples())
    assert (report.status, report.method) == ("match", "llamacpp")
    assert report.template_match is True and report.tokens_match is True
    assert report.first_diff is None


async def test_qwen2_from_the_gguf_matches_llama_server_on_every_sample(
    servers: dict[str, str], tokenizer_for: TokenizerFor
) -> None:
    """kvern's GGUF build follows llama.cpp, which applies no NFC.

    So sample 2's combining accent (``e`` + U+0301) tokenizes alike too.
    """
    report = await check(servers["qwen2"], tokenizer_for("qwen2"))
    assert (report.status, report.template_match, report.tokens_match) == ("match", True, True)


async def test_qwen2_nfc_normalizer_differs_from_llama_server(
    servers: dict[str, str], tokenizer_for: TokenizerFor
) -> None:
    """A real difference: Qwen2's own HF tokenizer applies NFC, llama.cpp's does not.

    transformers loads a Qwen2 model folder's tokenizer with an NFC step (as
    vLLM runs it); the same vocabulary with that step, put in front of
    llama-server, composes sample 2's ``e`` + U+0301 (combining acute) into
    ``é`` before splitting, while llama-server tokenizes the two code points.
    The templates agree; only the ids differ.
    """
    from tokenizers import normalizers

    gguf_built = tokenizer_for("qwen2")
    with_nfc = copy.deepcopy(gguf_built.hf)
    with_nfc.backend_tokenizer.normalizer = normalizers.NFC()
    tokenizer = ModelTokenizer(with_nfc, source=gguf_built.source)
    report = await check(servers["qwen2"], tokenizer)
    assert (report.status, report.template_match, report.tokens_match) == (
        "mismatch",
        True,
        False,
    )
    diff = report.first_diff
    assert diff is not None
    assert (diff["part"], diff["sample"]) == ("tokens", 2)
    at = diff["position"] - diff["ids_start"]
    assert diff["kvern_pieces"][at] == " é"
    assert diff["upstream_pieces"][at : at + 2] == [" e", "\u0301"]
    assert diff["kvern_ids"][:at] == diff["upstream_ids"][:at]
    assert diff["upstream_tokens"] == diff["kvern_tokens"] + 1
    assert diff["kvern"][diff["offset"] :].startswith(" é combining")
    assert report.detail == "tokens differ in samples [2]"


async def test_wrong_template_override_is_a_template_mismatch(
    servers: dict[str, str], tokenizer_for: TokenizerFor
) -> None:
    report = await check(
        servers["qwen2"], tokenizer_for("qwen2", WRONG_CHATML), samples=nfc_samples()
    )
    assert (report.status, report.method) == ("mismatch", "llamacpp")
    # kvern's own text tokenizes the same upstream: the template alone differs.
    assert report.template_match is False and report.tokens_match is True
    diff = report.first_diff
    assert diff is not None
    # Sample 0 has a system message; sample 1 gets the template's default one.
    assert (diff["part"], diff["sample"]) == ("template", 1)
    head = "<|im_start|>system\nYou are "
    assert diff["position"] == len(head)
    assert diff["kvern"][diff["offset"] :].startswith("a helpful assistant.<|im_end|>")
    assert diff["upstream"][diff["offset"] :].startswith("Qwen, created by Alibaba")
    assert diff["kvern"][: diff["offset"]] == head
    assert report.detail == "template differs in samples [1]"


# -- upstreams that cannot answer -------------------------------------------


async def test_upstream_without_parity_endpoints_is_unsupported(
    hf_tokenizers: dict[str, Any], tokenizer_for: TokenizerFor
) -> None:
    app, _ = create_fake_vllm({"tiny": hf_tokenizers["qwen2"]})
    with serve(app) as url:
        report = await check(url, tokenizer_for("qwen2"))
    assert (report.status, report.method) == ("unsupported", None)
    assert report.template_match is None and report.tokens_match is None
    assert report.detail is not None and "/tokenize" in report.detail


async def test_unreachable_upstream_is_an_error_not_an_exception(
    tokenizer_for: TokenizerFor,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    report = await check(dead, tokenizer_for("qwen2"))
    assert (report.status, report.method) == ("error", None)
    assert report.detail is not None and "cannot connect" in report.detail


async def test_fallback_tokenizer_is_skipped_without_asking_the_upstream() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"unexpected request {request.url}")

    fallback = ModelTokenizer(None, source=None, error="no tokenizer configured")
    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        report = await check_parity(client, upstream_at("http://up"), "m", fallback)
    assert report.status == "skipped_fallback"
    assert report.detail is not None and "no tokenizer configured" in report.detail


def vllm_like(tokenizer: Any, served: str) -> httpx.MockTransport:
    """vLLM's /tokenize for chats (HF template + tokenizer); no /apply-template."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/tokenize":
            return httpx.Response(404, json={"detail": "Not Found"})
        body = json.loads(request.content)
        if body["model"] != served:
            message = f"The model `{body['model']}` does not exist."
            return httpx.Response(404, json={"error": {"message": message, "code": 404}})
        ids = tokenizer.apply_chat_template(
            body["messages"], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return httpx.Response(200, json={"tokens": ids, "count": len(ids)})

    return httpx.MockTransport(handle)


@pytest.mark.parametrize(
    ("served", "template", "expected"),
    [
        ("m", None, ("match", None, True)),
        ("m", WRONG_CHATML, ("mismatch", None, False)),
        ("other", None, ("error", None, None)),
    ],
)
async def test_vllm_tokenize_compares_ids_of_the_whole_chat(
    hf_tokenizers: dict[str, Any],
    tokenizer_for: TokenizerFor,
    served: str,
    template: str | None,
    expected: tuple[str, bool | None, bool | None],
) -> None:
    transport = vllm_like(hf_tokenizers["qwen2"], served)
    async with httpx.AsyncClient(transport=transport) as client:
        report = await check_parity(
            client, upstream_at("http://vllm"), "m", tokenizer_for("qwen2", template)
        )
    assert (report.status, report.template_match, report.tokens_match) == expected
    if report.status == "error":
        assert report.detail is not None and "does not serve 'm'" in report.detail
    else:
        assert report.method == "vllm"
    if report.status == "mismatch":
        assert report.first_diff is not None
        assert (report.first_diff["part"], report.first_diff["sample"]) == ("tokens", 1)


# -- the registry hook, the checker and the store ----------------------------


async def test_registry_calls_on_loaded_once_per_model_name(small_bpe_dir: str) -> None:
    calls: list[str] = []
    config = TokenizersConfig(models={"m*": TokenizerEntry(source=small_bpe_dir)})
    registry = TokenizerRegistry(config, on_loaded=lambda model, tok: calls.append(model))
    first = await registry.get("m1")
    assert await registry.get("m1") is first
    assert await registry.get("m2") is first  # same tokenizer, another model name
    registry.get_sync("m3")  # synchronous loads are not announced
    assert calls == ["m1", "m2"]


def test_glob_names_are_not_checked_at_start_up() -> None:
    assert [n for n in ("qwen2.5:7b", "llama3*", "m?", "x[12]") if not is_glob(n)] == ["qwen2.5:7b"]


async def test_checker_records_to_store_and_analytics_reads_the_latest(
    tmp_path: Path, servers: dict[str, str], tokenizer_for: TokenizerFor
) -> None:
    async with AnalyticsStore(str(tmp_path / "kvern.db")) as store:
        await store.write_parity(
            ParityRow(1.0, "tiny", "old-upstream", None, "error", None, None, None, "down")
        )
        async with httpx.AsyncClient() as client:
            checker = ParityChecker(
                client=client, upstream=upstream_at(servers["llama3"]), store=store
            )
            checker.on_loaded("tiny", tokenizer_for("llama3"))
            checker.on_loaded("tiny", tokenizer_for("llama3"))  # once per model
            await checker.wait()
        assert list(checker.reports()) == ["tiny"]
        rows = await latest_parity(store)
        assert [(r["upstream"], r["status"]) for r in rows] == [
            (servers["llama3"].removeprefix("http://"), "match"),
            ("old-upstream", "error"),
        ]
        assert rows[0]["template_match"] is True and rows[0]["first_diff"] is None
        assert await latest_parity(store, model="other") == []


# -- wired into the app --------------------------------------------------------


def app_config(
    tmp_path: Path, url: str, models: dict[str, Any], *, parity_check: bool = True
) -> KvernConfig:
    return parse_config(
        {
            "upstream": {"base_url": url + "/v1", "read_timeout_s": 30.0},
            "tokenizers": {"models": models, "parity_check": parity_check},
            "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 20},
        }
    )


def test_health_and_analytics_show_parity_after_one_chat_request(
    tmp_path: Path, servers: dict[str, str], tokenizer_fixtures: dict[str, Any]
) -> None:
    models = {"tiny-llama*": str(tokenizer_fixtures["llama3"].directory)}
    with serve(create_app(app_config(tmp_path, servers["llama3"], models))) as url:
        assert httpx.get(url + "/health", timeout=30).json()["parity"] == {}
        reply = httpx.post(
            url + "/v1/chat/completions",
            json={
                "model": "tiny-llama3",
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 2,
            },
            timeout=60,
        )
        assert reply.status_code == 200
        # The check runs in the background once the request's tokenizer has
        # loaded; an "error" (a timeout on a loaded machine) is retried after 5 s.
        deadline = time.monotonic() + 60
        while True:
            parity = httpx.get(url + "/health", timeout=30).json()["parity"]
            status = parity.get("tiny-llama3", {}).get("status")
            if status not in (None, "error") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert list(parity) == ["tiny-llama3"], parity
        report = parity["tiny-llama3"]
        assert (report["status"], report["method"]) == ("match", "llamacpp"), report
        assert report["template_match"] is True and report["tokens_match"] is True
        rows = httpx.get(url + "/analytics", params={"window": "all"}, timeout=30).json()["parity"]
        assert [(r["model"], r["status"]) for r in rows] == [("tiny-llama3", "match")]


async def test_mismatch_is_reported_at_start_up(
    tmp_path: Path,
    servers: dict[str, str],
    tokenizer_fixtures: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = str(tokenizer_fixtures["qwen2"].directory)
    models = {
        "tiny-qwen": {"source": source, "chat_template": WRONG_CHATML},
        "tiny-qwen*": source,  # a glob: not checked until a request names a model
    }
    app = create_app(app_config(tmp_path, servers["qwen2"], models))
    caplog.set_level(logging.WARNING, logger="kvern.parity")
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        assert services.parity is not None
        await services.parity.wait()
        reports = services.parity.reports()
    assert list(reports) == ["tiny-qwen"]
    assert reports["tiny-qwen"].status == "mismatch"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "tiny-qwen" in warnings[0] and "MISMATCH" in warnings[0]
    assert "template differs in sample 1 at char 27" in warnings[0]
    assert "You are a helpful assistant.<|im_end|>" in warnings[0]  # kvern's side
    assert QWEN_DEFAULT_SYSTEM[:32] in warnings[0]  # llama-server's side


async def test_parity_check_can_be_turned_off(
    tmp_path: Path, servers: dict[str, str], tokenizer_fixtures: dict[str, Any]
) -> None:
    models = {"tiny-qwen": str(tokenizer_fixtures["qwen2"].directory)}
    app = create_app(app_config(tmp_path, servers["qwen2"], models, parity_check=False))
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        assert services.parity is None
        # With the check on, the exact model would be checked at start-up.
        await services.tracker.call("parity_wait")
        await asyncio.sleep(0.5)
        assert services.store is not None
        assert await latest_parity(services.store) == []
