"""Truth: kvern's predicted cached tokens against a real llama-server's own figures.

openai client -> kvern -> llama.cpp's llama-server (built from the PyPI sdist,
serving a tiny random-weight model with the real Qwen2 tokenizer and Qwen2.5
template). kvern's tokenizer and template engine (HF tokenizers + Jinja) and
llama-server's (C++) are independent implementations of the same model, and
llama-server reports what it really reused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvern.app import create_app
from kvern.config import KvernConfig, parse_config
from tests.llama_server import llama_server, tiny_model
from tests.servers import serve
from tests.truth import flush, rows

MODEL = "tiny-qwen2"
SYSTEM = "You are a terse assistant for the kvern test suite. " * 8


def config_for(
    tmp_path: Path, url: str, fixtures: dict[str, Any], **cache_model: Any
) -> KvernConfig:
    return parse_config(
        {
            "upstream": {
                "base_url": url + "/v1",
                "cache_model": {"kind": "llamacpp", **cache_model},
            },
            "tokenizers": {"models": {MODEL: str(fixtures["qwen2"].directory)}},
            "trie": {"block_size": 1, "min_prefix_tokens": 1},
            "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 10},
        }
    )


def chat(client: openai.OpenAI, messages: list[dict[str, str]], user: str | None = None) -> str:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
        **({"user": user} if user else {}),
    )
    return reply.choices[0].message.content or ""


@pytest.fixture(scope="module")
def one_slot() -> Iterator[str]:
    with llama_server(tiny_model("qwen2"), slots=1) as url:
        yield url


def run_conversation(kvern: str, turns: int, *, own_replies: bool, user: str | None = None) -> None:
    client = openai.OpenAI(base_url=kvern + "/v1", api_key="x", max_retries=0)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    for turn in range(turns):
        answer = chat(client, messages, user)
        reply = answer if own_replies else f"Scripted answer {turn}, as an agent framework writes."
        messages += [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": f"Turn {turn}: go on."},
        ]


def test_one_slot_one_conversation_agrees_exactly(
    tmp_path: Path, one_slot: str, tokenizer_fixtures: dict[str, Any]
) -> None:
    with serve(create_app(config_for(tmp_path, one_slot, tokenizer_fixtures))) as kvern:
        run_conversation(kvern, 6, own_replies=False)
        flush(kvern)
    table = rows(tmp_path / "kvern.db")
    assert len(table) == 6
    for row in table:
        assert row["reported_cached_source"] == "usage.prompt_tokens_details.cached_tokens"
        # Same rendering and tokenization as llama-server's own C++ implementation.
        assert row["prompt_tokens"] == row["upstream_prompt_tokens"], row
    predicted = [r["predicted_cached_tokens"] for r in table]
    reported = [r["reported_cached_tokens"] for r in table]
    assert reported[1] > 0
    assert predicted == reported


def test_the_models_own_replies_differ_only_by_re_tokenized_answer_tokens(
    tmp_path: Path, one_slot: str, tokenizer_fixtures: dict[str, Any]
) -> None:
    """The slot holds the answer's sampled ids; kvern sees only their text.

    kvern re-tokenizes the answer, which is exact when the model's output is
    canonically tokenized (real models, nearly always). This tiny model has
    random weights and samples odd ids (byte pieces, non-canonical splits),
    so its re-tokenized answers can part from the sampled ids: the prediction
    may then exceed the report, by at most the previous answer's length.
    """
    with serve(create_app(config_for(tmp_path, one_slot, tokenizer_fixtures))) as kvern:
        run_conversation(kvern, 6, own_replies=True)
        flush(kvern)
    table = rows(tmp_path / "kvern.db")
    for before, row in zip(table, table[1:], strict=False):
        gap = row["predicted_cached_tokens"] - row["reported_cached_tokens"]
        assert 0 <= gap <= before["completion_tokens"] - 1, (before, row)
        # Everything up to the end of the previous prompt is always predicted right.
        assert row["reported_cached_tokens"] >= before["prompt_tokens"]


def interleaved(kvern: str, conversations: int, turns: int, *, distinct: bool = False) -> None:
    """Several tenants' conversations, one turn each in rotation, scripted replies.

    ``distinct``: tenants share no system prompt, so llama-server picks its
    slot by LRU and goes through its RAM prompt cache.
    """
    client = openai.OpenAI(base_url=kvern + "/v1", api_key="x", max_retries=0)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    histories = [
        [
            {
                "role": "system",
                "content": (f"{words[c]} rules apply. " * 30)
                if distinct
                else SYSTEM + f" Tenant {c}: " + "policy text. " * (5 + c),
            },
            {"role": "user", "content": f"Hello from tenant {c}"},
        ]
        for c in range(conversations)
    ]
    for turn in range(turns):
        for c, messages in enumerate(histories):
            chat(client, messages, user=f"tenant-{c}")
            messages += [
                {"role": "assistant", "content": f"Reply {turn} to tenant {c}."},
                {"role": "user", "content": f"Tenant {c}, turn {turn}: more."},
            ]


def predicted_and_reported(db: Path) -> tuple[list[int], list[int], list[int]]:
    table = rows(db)
    return (
        [r["predicted_cached_tokens"] for r in table],
        [r["reported_cached_tokens"] for r in table],
        [r["matched_tokens"] for r in table],
    )


@pytest.mark.parametrize(
    ("slots", "cache_ram_mib", "distinct"),
    [(2, None, False), (1, None, False), (1, 0, False), (1, None, True), (2, None, True)],
    ids=[
        "two-slots",
        "one-slot-ram-cache",
        "one-slot-no-ram-cache",
        "one-slot-ram-cache-lru",
        "two-slots-ram-cache-lru",
    ],
)
def test_interleaved_tenants_agree_when_slots_and_ram_cache_are_modelled(
    tmp_path: Path,
    tokenizer_fixtures: dict[str, Any],
    slots: int,
    cache_ram_mib: int | None,
    distinct: bool,
) -> None:
    with llama_server(tiny_model("qwen2"), slots=slots, cache_ram_mib=cache_ram_mib) as url:
        config = config_for(
            tmp_path, url, tokenizer_fixtures, slots=slots, cache_ram=cache_ram_mib != 0
        )
        with serve(create_app(config)) as kvern:
            interleaved(kvern, conversations=3, turns=3, distinct=distinct)
            flush(kvern)
    predicted, reported, matched = predicted_and_reported(tmp_path / "kvern.db")
    assert len(reported) == 9
    assert predicted == reported
    if slots == 1 and cache_ram_mib == 0 and not distinct:
        # One slot, no RAM cache: each tenant's turn evicts the previous tenant's
        # context, so the backend reuses only the shared system-prompt head. A
        # prediction from kvern's trie alone (every prefix ever seen) would be
        # far too high; modelling the slot gets it exactly.
        assert all(m > r for m, r in zip(matched[3:], reported[3:], strict=True))


def test_analytics_shows_calibration_per_upstream_and_model(
    tmp_path: Path, one_slot: str, tokenizer_fixtures: dict[str, Any]
) -> None:
    config = config_for(tmp_path, one_slot, tokenizer_fixtures, slots=1, cache_ram=False)
    with serve(create_app(config)) as kvern:
        # Mis-modelled on purpose: the server keeps a RAM prompt cache, kvern
        # is told it has none, so some predictions come out wrong.
        interleaved(kvern, conversations=2, turns=3, distinct=True)
        out = httpx.get(
            kvern + "/analytics", params={"window": "all", "wait_s": 60}, timeout=90
        ).json()
    (entry,) = out["calibration"]
    table = rows(tmp_path / "kvern.db")
    errors = [abs(r["predicted_cached_tokens"] - r["reported_cached_tokens"]) for r in table]
    assert entry["model"] == MODEL and entry["backend_model"] == "llamacpp"
    assert entry["requests"] == len(table) == 6
    assert entry["reported_cached_tokens"] == sum(r["reported_cached_tokens"] for r in table)
    assert entry["mean_abs_error_tokens"] == pytest.approx(sum(errors) / 6)
    assert entry["exact_share"] == pytest.approx(sum(e == 0 for e in errors) / 6)
    assert entry["off_by_more_than_a_block_share"] == pytest.approx(sum(e > 1 for e in errors) / 6)
    assert max(errors) > 0
    worst = entry["worst"][0]
    assert abs(worst["predicted"] - worst["reported"]) == max(errors)


def upstream_mode_config(tmp_path: Path, url: str, fixtures: dict[str, Any]) -> KvernConfig:
    data = config_for(tmp_path, url, fixtures).model_dump()
    data["tokenizers"]["models"] = {MODEL: {"source": "upstream"}}
    return parse_config(data)


def test_upstream_tokenizer_mode_is_exact_without_a_local_tokenizer(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    # A fresh server: one that served earlier tests already holds this
    # system prompt, which a fresh kvern cannot know about.
    with (
        llama_server(tiny_model("qwen2"), slots=1) as url,
        serve(create_app(upstream_mode_config(tmp_path, url, tokenizer_fixtures))) as kvern,
    ):
        run_conversation(kvern, 4, own_replies=False)
        flush(kvern)
        health = httpx.get(kvern + "/health").json()
        hot = httpx.get(kvern + "/trie/visualize").json()[MODEL]["hot_prefixes"]
    assert health["tokenizers"][MODEL]["kind"] == "exact"
    assert health["tokenizers"][MODEL]["source"].startswith("upstream:")
    table = rows(tmp_path / "kvern.db")
    assert [r["tokenizer_kind"] for r in table] == ["exact"] * 4
    assert [r["prompt_tokens"] for r in table] == [r["upstream_prompt_tokens"] for r in table]
    assert [r["predicted_cached_tokens"] for r in table] == [
        r["reported_cached_tokens"] for r in table
    ]
    assert "terse assistant" in hot[0]["text"]


def slot_switching_history() -> list[tuple[str, list[dict[str, str]]]]:
    """Nine scripted requests of four tenants, built so that idle-slot saves show.

    Bravo and charlie share a system prompt. With 2 slots: alpha lands on
    slot 1, bravo on slot 0; alpha's next turn launches on slot 1, which saves
    idle slot 0 (bravo) to the RAM cache; charlie is similar enough to bravo's
    slot to take it without a save. Bravo's next turn (5th request) carries a
    long message, so no slot is similar enough: it goes to the LRU slot
    (alpha's), and only the copy saved while its slot sat idle gives it its
    whole first prompt back.
    """
    sa = "Alpha desk: answer in one line. " * 12
    sb = "Bravo desk: cite the ledger. " * 8
    sd = "Delta desk: be brief. " * 20
    long = "Here is the full shipping log to audit line by line. " * 60
    chats = {
        "alpha": [{"role": "system", "content": sa}, {"role": "user", "content": "Hello."}],
        "bravo": [
            {"role": "system", "content": sb},
            {"role": "user", "content": "Which invoice is overdue, and by how long? " * 3},
        ],
        "charlie": [
            {"role": "system", "content": sb},
            {"role": "user", "content": "Summarise the refund policy for damaged parcels. " * 3},
        ],
        "delta": [{"role": "system", "content": sd}, {"role": "user", "content": "Hello."}],
    }
    turns = [
        ("alpha", ""),
        ("bravo", ""),
        ("alpha", "More."),
        ("charlie", ""),
        ("bravo", long),
        ("delta", ""),
        ("alpha", "Again."),
        ("charlie", "And?"),
        ("delta", "Next."),
    ]
    out: list[tuple[str, list[dict[str, str]]]] = []
    for tenant, message in turns:
        chat_ = chats[tenant]
        if message:
            chat_ += [
                {"role": "assistant", "content": f"{tenant.title()} reply {len(chat_) // 2}."},
                {"role": "user", "content": message},
            ]
        out.append((tenant, list(chat_)))
    return out


@pytest.mark.parametrize(
    ("slots", "server_flags", "cache_model"),
    [
        (2, (), {}),
        (2, ("--no-cache-idle-slots",), {"cache_idle_slots": False}),
        (2, ("--kv-unified",), {"kv_unified": True}),
        (1, (), {}),
        (1, ("--no-cache-idle-slots",), {"cache_idle_slots": False}),
    ],
    ids=[
        "two-slots",
        "two-slots-no-idle-saves",
        "two-slots-unified-kv",
        "one-slot",
        "one-slot-no-idle-saves",
    ],
)
def test_idle_slot_saves_are_replayed_request_by_request(
    tmp_path: Path,
    tokenizer_fixtures: dict[str, Any],
    slots: int,
    server_flags: tuple[str, ...],
    cache_model: dict[str, Any],
) -> None:
    """llama-server's defaults save every idle slot at each task launch; kvern replays it."""
    with llama_server(tiny_model("qwen2"), slots=slots, extra=server_flags) as url:
        config = config_for(tmp_path, url, tokenizer_fixtures, slots=slots, **cache_model)
        with serve(create_app(config)) as kvern:
            client = openai.OpenAI(base_url=kvern + "/v1", api_key="x", max_retries=0)
            for tenant, messages in slot_switching_history():
                chat(client, messages, user=tenant)
            flush(kvern)
    table = rows(tmp_path / "kvern.db")
    assert [r["prompt_tokens"] for r in table] == [r["upstream_prompt_tokens"] for r in table]
    predicted, reported, _ = predicted_and_reported(tmp_path / "kvern.db")
    assert predicted == reported
    bravo_first, bravo_again = table[1]["prompt_tokens"], reported[4]
    if slots == 2 and not cache_model:
        # Only the idle-slot save kept bravo's first prompt whole.
        assert bravo_again == bravo_first
    else:
        assert bravo_again < bravo_first
