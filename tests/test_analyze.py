"""``kvern analyze LOG``: a log with a planted cause, through the command as users run it.

The command runs as a subprocess (``python -m kvern analyze``) with the real
Llama 3 tokenizer and template, and its ``--json`` is read back: the planted
cause is the top site, in the right place, with a rule that saves tokens,
and every tally adds up. The parts that need no tokenizer (the log reader,
the LRU, the site book, the progress bar) are tested directly.
"""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from kvern.analyze.log import LogFile, endpoint_of_url, parse_line
from kvern.analyze.lru import LruBlocks
from kvern.analyze.progress import Progress
from kvern.analyze.sitebook import SiteBook
from kvern.analyze.text import table
from kvern.diagnosis.lru_reference import simulate_lru
from kvern.diagnosis.replay import Sample
from kvern.diagnosis.sites import Divergence
from tests.assets import TokenizerFixture

ROOT = Path(__file__).resolve().parent.parent
POLICY = (
    " Policy: refunds within 30 days of purchase; shipping is free over 50 dollars;"
    " answer in two sentences at most."
) * 4
SYSTEM = "You are the support assistant of Acme. Session id: {id}. Be kind." + POLICY
UUID_RE = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
DAY_S = 86_400.0


def _ids(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(n)]


def _chat(system: str, question: str) -> dict[str, Any]:
    return {
        "model": "llama3",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
    }


def batch_line(i: int, body: dict[str, Any], url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})


def uuid_log(path: Path, n: int = 12) -> Path:
    """A Batch input file: every request puts a fresh id into the same system prompt."""
    lines = [
        batch_line(i, _chat(SYSTEM.format(id=u), f"Where is order {i}?"))
        for i, u in enumerate(_ids(n))
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def analyze(
    log: Path, tokenizer: TokenizerFixture, *args: str, cwd: Path | None = None
) -> tuple[int, str, str]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvern",
            "analyze",
            str(log),
            "--tokenizer",
            str(tokenizer.directory),
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=cwd or log.parent,  # no ./config.yaml there: the defaults
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        timeout=180,
    )
    return proc.returncode, proc.stdout, proc.stderr


def analyze_json(log: Path, tokenizer: TokenizerFixture, *args: str) -> dict[str, Any]:
    code, out, err = analyze(log, tokenizer, "--json", *args)
    assert code == 0, err
    report: dict[str, Any] = json.loads(out)
    return report


def assert_adds_up(tally: dict[str, Any]) -> None:
    reasons = sum(r["tokens"] for r in tally["reasons"].values())
    assert tally["reused_tokens"] + tally["lost_tokens"] == tally["prompt_tokens"]
    assert reasons == tally["lost_tokens"]
    assert tally["adds_up"] is True
    assert tally["reused_tokens"] <= tally["reusable_tokens"] <= tally["reusable_any_tokens"]


@pytest.fixture(scope="module")
def llama3(tokenizer_fixtures: dict[str, TokenizerFixture]) -> TokenizerFixture:
    return tokenizer_fixtures["llama3"]


def test_a_uuid_in_the_system_prompt_is_the_top_site_with_a_uuid_rule_that_saves_tokens(
    tmp_path: Path, llama3: TokenizerFixture
) -> None:
    report = analyze_json(uuid_log(tmp_path / "batch.jsonl"), llama3)
    assert report["requests"] == 12
    assert report["bad_lines"] == {"count": 0, "lines": []}
    assert report["models"][0]["tokenizer"]["kind"] == "exact"
    totals = report["totals"]
    assert_adds_up(totals)
    for group in report["groups"]:
        assert_adds_up(group)
    assert totals["reasons"]["diverged"]["requests"] == 11  # all but the first
    top = report["sites"]["top"][0]
    assert (top["place"], top["place_kind"], top["tenant"]) == ("system prompt", "system", "-")
    assert top["requests"] == 11
    assert top["tokens_lost"] == totals["reasons"]["diverged"]["tokens"]
    example = top["examples"][0]
    ours = example["ours_marked"]
    assert ours.lstrip().startswith("[") and "]. Be kind." in ours
    advice = top["advice"]
    assert advice["kind"] == "uuid"
    rule = advice["rule"]
    assert rule["scope"] == "messages" and rule["replacement"] == "<uuid>"
    assert rule["pattern"].startswith("(?<=") and UUID_RE in rule["pattern"]
    assert advice["measured"]["saved_tokens"] > 0
    assert advice["measured"]["merges_beyond_span"] is False
    # The snippet is config.yaml's own form: it loads and validates as one.
    import yaml

    from kvern.config import parse_config

    pasted = parse_config(yaml.safe_load(advice["yaml"]))
    assert [r.pattern for r in pasted.rules_for("llama3")] == [rule["pattern"]]
    # Replaying the whole log with the rule: what was lost to the id comes back.
    what_if = report["what_if"]["rules"][0]
    assert what_if["rule"] == rule and what_if["sites"] == [1]
    assert what_if["saved_tokens"] > 0
    assert what_if["after"]["reused_tokens"] > what_if["before"]["reused_tokens"]
    assert what_if["recovered_share"] > 0.8
    assert report["what_if"]["all"] is None  # one rule: nothing to combine
    curve = report["capacity"]["models"][0]
    assert curve["total_tokens"] == totals["prompt_tokens"]
    assert curve["points"][-1]["reused_tokens"] == totals["reusable_tokens"]


def test_an_id_at_the_start_of_a_system_prompt_gets_a_rule_that_works_in_the_replay(
    tmp_path: Path, llama3: TokenizerFixture
) -> None:
    """The what-if applies the rule through kvern's own Normalizer (before rendering, for
    scope messages): a rule anchored on the template's text would change nothing there."""
    log = tmp_path / "head.jsonl"
    lines = [
        batch_line(i, _chat(f"Request id: {u}. Be kind." + POLICY, "Where is my order?"))
        for i, u in enumerate(_ids(8))
    ]
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = analyze_json(log, llama3)
    top = report["sites"]["top"][0]
    rule = top["advice"]["rule"]
    assert top["place"] == "system prompt"
    assert rule["scope"] == "messages" and "\\n" not in rule["pattern"]
    (what_if,) = report["what_if"]["rules"]
    assert what_if["rule"] == rule
    assert what_if["saved_tokens"] > 0 and what_if["recovered_share"] == 1.0


def test_a_capture_log_takes_tenants_from_kvern_and_renders_each_day_it_was_sent(
    tmp_path: Path, llama3: TokenizerFixture
) -> None:
    """Two tenants; ``daily`` sends the same chat on three days: the template's date parts."""
    start = time.mktime((2025, 6, 2, 12, 0, 0, 0, 0, -1))
    lines = []
    for i in range(9):
        tenant = "key:daily" if i % 3 == 0 else "key:steady"
        ts = start + (i // 3) * DAY_S if tenant == "key:daily" else start + i
        system = (
            "Summarise the overnight incident queue for the on-call engineer." + POLICY
            if tenant == "key:daily"
            else SYSTEM.format(id="fixed")
        )
        body = _chat(system, "Go." if tenant == "key:daily" else f"Question {i}?")
        meta = {"ts_s": ts, "tenant": tenant, "end_user": None, "endpoint": "chat"}
        lines.append(
            json.dumps(
                {
                    "custom_id": f"kv-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                    "kvern": meta,
                }
            )
        )
    log = tmp_path / "capture.jsonl"
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = analyze_json(log, llama3)
    tenants = {g["tenant"]: g for g in report["groups"]}
    assert set(tenants) == {"key:daily", "key:steady"}
    assert tenants["key:daily"]["requests"] == 3
    daily = [s for s in report["sites"]["top"] if s["tenant"] == "key:daily"]
    assert daily, report["sites"]
    top = daily[0]
    assert top["place"] == "template text" and top["requests"] == 2
    assert "Jun 2025" in top["examples"][0]["ours"] + top["examples"][0]["before"]
    assert top["advice"]["kind"] == "date" and top["advice"]["rule"]["scope"] == "prompt"
    per_tenant = report["capacity"]["tenants"]
    assert {c["tenant"] for c in per_tenant} == {"key:daily", "key:steady"}


def test_bad_lines_are_counted_with_their_numbers_and_the_rest_analysed(
    tmp_path: Path, llama3: TokenizerFixture
) -> None:
    log = uuid_log(tmp_path / "mixed.jsonl", n=4)
    good = log.read_text(encoding="utf-8").splitlines()
    lines = [
        good[0],
        "{not json",
        "[1, 2]",
        batch_line(9, {"input": "embed me"}, url="/v1/embeddings"),
        json.dumps(
            {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": "a string"}
        ),
        "",
        *good[1:],
        batch_line(10, {"model": "llama3", "prompt": "Once upon a time"}, url="/v1/completions"),
        json.dumps(_chat("bare body", "hi")),
    ]
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = analyze_json(log, llama3)
    assert report["requests"] == 6  # four chats, a completion, a bare body
    bad = report["bad_lines"]
    assert bad["count"] == 4
    assert [b["line"] for b in bad["lines"]] == [2, 3, 4, 5]
    assert "not JSON" in bad["lines"][0]["error"]
    assert "/v1/embeddings" in bad["lines"][2]["error"]
    assert_adds_up(report["totals"])


def test_a_rules_file_is_applied_and_a_bad_one_is_refused_as_kvern_serve_words_it(
    tmp_path: Path, llama3: TokenizerFixture
) -> None:
    log = uuid_log(tmp_path / "batch.jsonl")
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "- pattern: '(?<=Session id: )" + UUID_RE + "'\n  replacement: '<uuid>'\n",
        encoding="utf-8",
    )
    report = analyze_json(log, llama3, "--rules", str(rules))
    assert report["settings"]["rules"]["*"][0]["replacement"] == "<uuid>"
    totals = report["totals"]
    assert_adds_up(totals)
    # The id no longer parts the prompts: what is left is each new question.
    assert all(s["place"] != "system prompt" for s in report["sites"]["top"])
    assert totals["reused_tokens"] > 0.8 * totals["prompt_tokens"] * 11 / 12 - 200
    rules.write_text(
        "normalization:\n  llama3:\n    - pattern: '(unclosed'\n      replacement: x\n",
        encoding="utf-8",
    )
    code, out, err = analyze(log, llama3, "--rules", str(rules))
    assert code == 2 and out == ""
    assert f"{rules}: invalid configuration" in err
    assert "normalization.llama3.0.pattern" in err and "invalid regular expression" in err


def test_text_output_has_the_tables_a_rule_to_paste_and_a_capacity_plot(
    tmp_path: Path, llama3: TokenizerFixture
) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "curve.png"
    code, out, err = analyze(
        uuid_log(tmp_path / "batch.jsonl"),
        llama3,
        "--plot",
        str(png),
        "--kv-bytes-per-token",
        "131072",
        "--capacity-tokens",
        "16",  # one block: the shared prefix (two blocks) no longer fits
    )
    assert code == 0, err
    assert "analyze log [" not in err  # stderr is no terminal and --progress was not given
    for expected in (
        "Prompt tokens reusable",
        "Why the other tokens were not reused",
        "#1 llama3 · tenant - · system prompt · 11 request(s)",
        "ours:   …",
        "suggested rule (uuid)",
        "replacement: <uuid>",
        "What if: the whole log replayed",
        "Capacity (llama3, block 16)",
        "evicted",
    ):
        assert expected in out, expected
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_goes_to_stderr_when_asked_and_never_into_json(
    tmp_path: Path, llama3: TokenizerFixture
) -> None:
    code, out, err = analyze(uuid_log(tmp_path / "batch.jsonl"), llama3, "--json", "--progress")
    assert code == 0
    json.loads(out)
    assert "analyze log [####################] 100%  12 requests" in err
    assert "analyze rule 1/1" in err


def test_a_log_with_no_request_exits_1_and_a_missing_one_2(
    tmp_path: Path, llama3: TokenizerFixture
) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("{not json\n", encoding="utf-8")
    code, out, _ = analyze(empty, llama3, "--json")
    assert code == 1 and json.loads(out)["bad_lines"]["count"] == 1
    code, _, err = analyze(tmp_path / "absent.jsonl", llama3)
    assert code == 2 and "absent.jsonl" in err


def test_the_config_gives_the_tokenizer_block_and_rules_of_model_or_each_body_model(
    tmp_path: Path, llama3: TokenizerFixture
) -> None:
    """``--model`` takes every line for that model; without it each body's own model counts,
    and one the config has no tokenizer for is tokenized approximately, with a warning."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"tokenizers:\n  models:\n    llama3: {llama3.directory}\n"
        "trie:\n  block_size: 8\n"
        f"normalization:\n  llama3:\n    - pattern: '(?<=Session id: ){UUID_RE}'\n"
        "      replacement: '<uuid>'\n",
        encoding="utf-8",
    )
    log = uuid_log(tmp_path / "batch.jsonl", n=4)
    text = log.read_text(encoding="utf-8").replace('"model": "llama3"', '"model": "gpt-x"')
    log.write_text(text, encoding="utf-8")
    base = [sys.executable, "-m", "kvern", "analyze", str(log), "--config", str(config), "--json"]
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([*base, "--model", "llama3"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    (model,) = report["models"]
    assert (model["model"], model["block_size"], model["tokenizer"]["kind"]) == (
        "llama3",
        8,
        "exact",
    )
    assert report["totals"]["reasons"]["diverged"]["tokens"] < 4 * 20  # the rule joined them
    run = subprocess.run(base, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    (model,) = json.loads(run.stdout)["models"]
    assert (model["model"], model["tokenizer"]["kind"]) == ("gpt-x", "fallback")
    assert "WARNING: gpt-x was tokenized approximately" in run.stderr


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from kvern.__main__ import main\n"
        f"sys.exit(main(['analyze', {str(uuid_log(tmp_path / 'b.jsonl', n=2))!r}, "
        f"'--plot', {str(tmp_path / 'c.png')!r}]))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 2
    assert "--plot needs matplotlib: pip install 'kvern[plot]'" in run.stderr
    assert not (tmp_path / "c.png").exists()


# -- the parts, without a tokenizer ------------------------------------------------------


def test_lines_are_read_as_batch_capture_or_bare_bodies() -> None:
    assert endpoint_of_url("/v1/chat/completions") == "chat"
    assert endpoint_of_url("/v1/completions?x=1") == "completions"
    assert endpoint_of_url("/api/generate") == "ollama_generate"
    assert endpoint_of_url("/v1/embeddings") is None
    line, why = parse_line(
        json.dumps(
            {
                "url": "/v1/chat/completions",
                "body": {"model": "m", "messages": [], "user": "u1", "metadata": {"team": "a"}},
            }
        ).encode(),
        3,
        "metadata.team",
    )
    assert why is None and line is not None
    assert (line.line_no, line.endpoint, line.model, line.tenant, line.ts_s) == (
        3,
        "chat",
        "m",
        "a",
        None,
    )
    captured = {
        "url": "/api/chat",
        "body": {"messages": []},
        "kvern": {"ts_s": 5, "tenant": "key:t", "endpoint": "ollama_chat"},
    }
    line, _ = parse_line(json.dumps(captured).encode(), 1, "user")
    assert line is not None and (line.tenant, line.ts_s, line.endpoint) == (
        "key:t",
        5.0,
        "ollama_chat",
    )
    line, _ = parse_line(b'{"prompt": "hi"}', 1, None)
    assert line is not None and line.prompt.text == "hi" and line.tenant == "-"
    assert parse_line(b'{"messages": "no"}', 1, None)[1] == "no chat prompt in its body"


def test_the_log_is_streamed_and_reread_for_each_pass(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n', encoding="utf-8")
    log = LogFile(path)
    assert [x.prompt.text for x in log.read()] == ["a", "b"]
    assert log.bytes_read == log.size_bytes
    assert [x.line_no for x in log.read()] == [1, 3]


def test_the_lru_serves_what_the_brute_force_reference_does() -> None:
    rng = random.Random(3)
    stems = [[rng.randrange(50) for _ in range(rng.randrange(8, 60))] for _ in range(6)]
    requests = [
        stems[rng.randrange(6)][: rng.randrange(1, 60)] + [rng.randrange(50)] * 3
        for _ in range(200)
    ]
    for capacity_tokens in (0, 16, 40, 100, 400, 10_000):
        lru = LruBlocks(capacity_tokens, 4)
        ours = sum(lru.access(r) for r in requests)
        assert ours == simulate_lru(requests, 4, capacity_tokens // 4), capacity_tokens
        assert len(lru) <= capacity_tokens // 4


def _divergence(prefix: str) -> Divergence:
    return Divergence(5, "system prompt", "system", prefix, "before ", "ours", "theirs")


def test_the_site_book_ranks_by_tokens_lost_and_sheds_samples_within_its_bound() -> None:
    book = SiteBook(max_sites=3, max_sample_bytes=1_000)
    for i in range(40):
        prefix = f"p{i % 4}"
        book.add("m", "t", _divergence(prefix), Sample("x" * 100, 3), (i % 4 + 1) * 10, i + 1)
        book.check_invariants()
        assert book.sample_bytes <= 1_000
    ranked = book.ranked()
    assert [s.prefix_id for s in ranked] == ["p2", "p1", "p0"]  # p3 came past max_sites
    assert book.untracked_requests == 10 and book.untracked_tokens == 400
    assert ranked[0].samples, "the costliest site keeps samples"
    assert len(ranked[0].examples) == 8


def test_the_bar_is_drawn_only_when_enabled() -> None:
    now = [0.0]
    stream = io.StringIO()
    bar = Progress(stream, 100, enabled=True, clock=lambda: now[0])
    update = bar.phase("log")
    assert update is not None
    now[0] = 1.0
    update(50, 7)
    bar.finish()
    assert stream.getvalue().endswith(
        "\ranalyze log [##########..........]  50%  7 requests  1.0 s\n"
    )
    silent = io.StringIO()
    assert Progress(silent, 100, enabled=False).phase("log") is None
    assert silent.getvalue() == ""


def test_tables_align_numbers_right_and_text_left() -> None:
    assert table(["name", "tokens", "share"], [["a", 1234, 0.5], ["bb", 5, None]]) == [
        "name  tokens  share",
        "a      1,234  50.0%",
        "bb         5      -",
    ]
