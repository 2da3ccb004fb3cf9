"""Run one simulated replica (``tests/replica_sim.py``) as its own process.

    python -m tests.replica_main --name r0 --port 8101 --capacity-blocks 512 \\
        --max-concurrency 8 --prefill-us-per-token 30 --decode-ms-per-token 3 \\
        [--tokenizer qwen2|words]

Served by uvicorn on 127.0.0.1, log level warning, until SIGTERM. Why processes:
routers under test are processes, and replicas sharing the load generator's
event loop (or GIL) would distort its timings. A program that restarts many
replicas (``bench/routing.py``, between contenders) can load the tokenizer once
and :func:`fork_replica` them instead: each is still a fresh process with a
fresh cache, started in a fraction of a second.

``--tokenizer qwen2`` counts tokens as a vLLM serving Qwen2.5 would: the real
Qwen2 tokenizer and Qwen2.5 chat template (``tests/assets.py``), the files kvern
is given, so both count the same tokens. Two costs would distort a benchmark on
a 2-core machine, so :class:`ChatTokenizer` avoids them without changing an id:

- start-up: importing ``transformers`` and building its tokenizer object costs
  about 3 s of CPU; the ``tokenizers`` library reads ``tokenizer.json`` and Jinja,
  set up as ``apply_chat_template`` sets it up, renders the template (about 1 s);
- per request: tokenizing a 2,000-token chat costs about 8 ms; a segment cache
  makes a conversation's next turn cost well under 1 ms.

``tests/test_routing_trace.py`` checks the ids against ``transformers``'
``apply_chat_template(..., tokenize=True)`` on the benchmark's conversations,
and the replica checks its cache against a full encode now and then.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

logger = logging.getLogger("replica")

# Check the segment cache against a full encode on the first requests and then
# on every VERIFY_EVERY-th, so a mismatch cannot go unseen.
VERIFY_FIRST = 3
VERIFY_EVERY = 64
SEGMENT_CACHE_ENTRIES = 8192


def compile_chat_template(source: str) -> Any:
    """A Jinja template set up as ``transformers`` sets up chat templates.

    Same environment options (``trim_blocks``, ``lstrip_blocks``, loop controls,
    sandboxed) and the same ``raise_exception`` and non-escaping ``tojson``;
    those decide the rendered text, hence the ids.
    """
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


class ChatTokenizer:
    """Chat body -> prompt ids, as ``apply_chat_template(add_generation_prompt=True)``.

    Why the segment cache is exact: a HuggingFace tokenizer first cuts the text
    at its added tokens (``<|im_start|>``, ``<|im_end|>``, ...), then normalizes,
    pre-tokenizes and BPE-encodes each piece between them on its own. When no
    added token strips its neighbours' whitespace or is matched after
    normalization (true of Qwen2's; checked here, else the cache stays off),
    the ids of a rendered chat are the concatenation of the ids of its pieces.
    A piece -- one message with its role line -- is then cached, and each turn
    of a conversation encodes only its new messages. Rendering is cheap and
    always done. If a periodic check ever disagrees, the cache is switched off
    for good and a warning logged.
    """

    def __init__(self, tokenizer: Any, template: Any, *, special: dict[str, str]) -> None:
        self._tok = tokenizer
        self._template = template
        self._special = special  # bos_token / eos_token, as the template sees them
        added = tokenizer.get_added_tokens_decoder()
        self._added_ids = {tok.content: int(i) for i, tok in added.items()}
        longest_first = sorted(self._added_ids, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in longest_first) + ")")
        self._segments: OrderedDict[str, list[int]] = OrderedDict()
        self._calls = 0
        # False when splitting would not be exact, or once a check has failed.
        self.fast = not any(
            t.lstrip or t.rstrip or t.single_word or t.normalized for t in added.values()
        )

    @classmethod
    def from_directory(cls, directory: Path) -> ChatTokenizer:
        """Load ``tokenizer.json``, the chat template and the special tokens of a HF folder."""
        from tokenizers import Tokenizer

        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        template_file = directory / "chat_template.jinja"
        if template_file.exists():
            source = template_file.read_text(encoding="utf-8")
        else:
            source = config["chat_template"]
        special = {
            k: config[k] for k in ("bos_token", "eos_token") if isinstance(config.get(k), str)
        }
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        return cls(tokenizer, compile_chat_template(source), special=special)

    def render(self, messages: list[dict[str, Any]]) -> str:
        return str(
            self._template.render(messages=messages, add_generation_prompt=True, **self._special)
        )

    def encode_full(self, text: str) -> list[int]:
        """The reference: the whole rendered text through the tokenizer, uncached."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_cached(self, text: str) -> list[int]:
        """Cut at added tokens, encode each piece through the segment cache."""
        ids: list[int] = []
        for piece in self._split.split(text):
            if not piece:
                continue
            special = self._added_ids.get(piece)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(self._segment(piece))
        return ids

    def _segment(self, piece: str) -> list[int]:
        hit = self._segments.get(piece)
        if hit is not None:
            self._segments.move_to_end(piece)
            return hit
        encoded: list[int] = self._tok.encode(piece, add_special_tokens=False).ids
        self._segments[piece] = encoded
        if len(self._segments) > SEGMENT_CACHE_ENTRIES:
            self._segments.popitem(last=False)
        return encoded

    def __call__(self, body: dict[str, Any]) -> list[int]:
        text = self.render(body.get("messages", []))
        self._calls += 1
        if not self.fast:
            return self.encode_full(text)
        ids = self.encode_cached(text)
        if self._calls <= VERIFY_FIRST or self._calls % VERIFY_EVERY == 0:
            reference = self.encode_full(text)
            if reference != ids:
                logger.warning("segment cache disagrees with a full encode; turning it off")
                self.fast = False
                return reference
        return ids


def load_tokenizer(kind: str) -> Any:
    """The body -> ids function for ``--tokenizer``."""
    if kind == "words":
        from tests.replica_sim import word_hash_tokenize

        return word_hash_tokenize
    from tests.assets import tokenizer_fixture

    return ChatTokenizer.from_directory(tokenizer_fixture(kind).directory)


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """One replica's settings (the command-line flags)."""

    name: str
    port: int
    capacity_blocks: int
    max_concurrency: int
    prefill_us_per_token: float
    decode_ms_per_token: float
    block_size: int = 16
    model: str = "sim"
    kv_events_port: int = 0  # publish vLLM-form KV events there (0: none)


def serve(spec: ReplicaSpec, tokenize: Any, log_path: str | None = None) -> None:
    """Serve one replica on 127.0.0.1 until SIGTERM (uvicorn's graceful stop)."""
    import uvicorn

    from tests.replica_sim import create_replica

    if log_path:  # a forked child: its output goes to its own file, not the parent's
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    logging.basicConfig(level=logging.WARNING, format=f"{spec.name} %(levelname)s %(message)s")
    app, _ = create_replica(
        spec.name,
        block_size=spec.block_size,
        capacity_blocks=spec.capacity_blocks,
        max_concurrency=spec.max_concurrency,
        prefill_s_per_token=spec.prefill_us_per_token / 1e6,
        decode_s_per_token=spec.decode_ms_per_token / 1e3,
        tokenize=tokenize,
        model=spec.model,
        kv_events_port=spec.kv_events_port,
    )
    uvicorn.run(app, host="127.0.0.1", port=spec.port, log_level="warning", access_log=False)


def preload_server_modules() -> None:
    """Import what uvicorn imports as it starts, so that forked children need not."""
    import importlib

    for module in (
        "tests.replica_sim",
        "uvicorn.loops.auto",
        "uvicorn.protocols.http.auto",
        "uvicorn.protocols.websockets.auto",
        "uvicorn.lifespan.on",
        "uvloop",
        "httptools",
    ):
        with contextlib.suppress(ImportError):  # optional speed-ups of uvicorn
            importlib.import_module(module)


def fork_replica(spec: ReplicaSpec, tokenize: Any, log_path: str) -> BaseProcess:
    """Start a replica in a forked child that inherits an already loaded tokenizer.

    Why: a benchmark that restarts four replicas per contender would otherwise
    spend about a second of CPU per replica loading the same tokenizer again.
    The child is a fresh process with fresh state (empty prefix cache, zeroed
    counters); only the read-mostly tokenizer comes from the parent. The parent
    must not be running an event loop or threads of its own when it forks, and
    should set ``TOKENIZERS_PARALLELISM=false`` before using the tokenizer.
    """
    preload_server_modules()
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(
        target=serve, args=(spec, tokenize, log_path), name=f"replica-{spec.name}", daemon=True
    )
    proc.start()
    return proc


def parse_args(argv: list[str] | None = None) -> tuple[ReplicaSpec, str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--capacity-blocks", type=int, required=True)
    parser.add_argument("--max-concurrency", type=int, required=True)
    parser.add_argument("--prefill-us-per-token", type=float, required=True)
    parser.add_argument("--decode-ms-per-token", type=float, required=True)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--tokenizer", choices=["qwen2", "words"], default="words")
    parser.add_argument("--model", default="sim")
    args = parser.parse_args(argv)
    spec = ReplicaSpec(
        name=args.name,
        port=args.port,
        capacity_blocks=args.capacity_blocks,
        max_concurrency=args.max_concurrency,
        prefill_us_per_token=args.prefill_us_per_token,
        decode_ms_per_token=args.decode_ms_per_token,
        block_size=args.block_size,
        model=args.model,
    )
    return spec, args.tokenizer


def main(argv: list[str] | None = None) -> None:
    spec, tokenizer = parse_args(argv)
    serve(spec, load_tokenizer(tokenizer))


if __name__ == "__main__":
    main()
