"""Tokenizer and template parity: does kvern see the prompt the backend sees?

Why: every figure kvern reports rests on rendering and tokenizing each request
exactly as the backend does. A different chat template (an override, a newer
revision, a system prompt the backend injects) or a tokenizer that splits text
differently breaks that silently: the trie keeps counting, the numbers are just
wrong. So once per model kvern renders a few sample chats with its own pipeline
and asks the upstream to do the same, through the endpoints backends offer::

    llama.cpp's server                          vLLM
    POST /apply-template {messages}             POST /tokenize {model, messages,
      -> {"prompt": text}     (the template)          add_generation_prompt: true}
    POST /tokenize {content: kvern's text,        -> {"tokens": [...], "count": n}
      add_special: false, parse_special: true}       (template and tokenizer
      -> {"tokens": [...]}    (the tokenizer)         together)

llama.cpp's answers tell the two apart: its template output is compared with
kvern's text, and kvern's *own* text is tokenized upstream, so a tokenizer
difference shows up even where the templates agree. One detail: llama.cpp cuts
a leading BOS from the rendered text when its vocabulary adds BOS at
tokenization, and adds it back when it tokenizes the prompt; the text it really
feeds the model is ``BOS + prompt``, so that is what is compared (the tokens it
adds are learned from ``/tokenize`` of an empty string with ``add_special``).

Anything else (no such endpoints, the upstream down) is a report with status
``unsupported`` or ``error``, never an exception: the check is advice and must
never disturb the proxy. :class:`ParityChecker` runs the check in the
background, once per model name, and keeps the latest report for /health.
The endpoints and the description of a difference live in
:mod:`kvern.parity.probes`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import httpx

from kvern.analytics.parity_rows import ParityRow
from kvern.analytics.store import AnalyticsStore
from kvern.errors import KvernError
from kvern.parity.probes import (
    NO_ENDPOINT,
    ParityMethod,
    Probe,
    ProbeError,
    Unsupported,
    compare_llamacpp,
    compare_vllm,
)
from kvern.tokenize.model_tokenizer import ModelTokenizer, PromptTokens
from kvern.tokenize.registry import TokenizerRegistry
from kvern.upstream.client import Upstream

logger = logging.getLogger(__name__)

ParityStatus = Literal["match", "mismatch", "unsupported", "error", "skipped_fallback"]
# Runs a synchronous function off the event loop (the app passes the tracking
# thread, which owns the tokenizers' segment caches).
RunSync = Callable[..., Awaitable[Any]]

_GLOB_CHARS = frozenset("*?[")


def default_samples() -> list[list[dict[str, Any]]]:
    """The built-in sample chats: system + user, three turns, unicode and odd whitespace."""
    return [
        [
            {"role": "system", "content": "You are a careful assistant. Answer in one sentence."},
            {"role": "user", "content": "What does a KV cache store?"},
        ],
        [
            {"role": "user", "content": "Hi! Can you help me plan a trip?"},
            {"role": "assistant", "content": "Of course. Where would you like to go?"},
            {"role": "user", "content": "Somewhere warm in March, for a week."},
            {
                "role": "assistant",
                "content": "Consider the Canary Islands: about 22 °C in March, short flights.",
            },
            {"role": "user", "content": "What should I pack?"},
        ],
        [
            {"role": "system", "content": "  Leading and trailing spaces   \n\n\n"},
            {
                "role": "user",
                "content": (
                    "Ünïcödé: café, naïve, Ångström, 日本語のテキスト, 한국어, Ελληνικά, "
                    "русский, emoji 🦙👩\u200d💻, e\u0301 combining\n\ttab\u00a0nbsp"
                    "\u3000ideographic space\r\nwindows line\n\n\n  indented   "
                ),
            },
        ],
    ]


def is_glob(name: str) -> bool:
    """True for a model-map key that is a pattern rather than one model name."""
    return any(c in _GLOB_CHARS for c in name)


@dataclass(slots=True)
class ParityReport:
    """The outcome of one parity check of a model against an upstream."""

    model: str  # request model name
    upstream: str  # the upstream's name (host:port unless configured)
    method: ParityMethod | None  # how the upstream was asked; None when it could not be
    status: ParityStatus  # match, mismatch, unsupported, error, skipped_fallback
    template_match: bool | None = None  # None: not compared (vLLM, or no answer)
    tokens_match: bool | None = None  # None: not compared
    # The first difference: part ("template"/"tokens"), sample index, position
    # (char offset or token index), both sides' text around it (``offset``: where
    # in those snippets it starts) and, for tokens, the ids around it.
    first_diff: dict[str, Any] | None = None
    checked_at_s: float = 0.0  # wall clock when the check ended
    detail: str | None = None  # why unsupported / error, or a note on the differences

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_row(self) -> ParityRow:
        """The analytics row of this report."""
        return ParityRow(
            ts_s=self.checked_at_s,
            model=self.model,
            upstream=self.upstream,
            method=self.method,
            status=self.status,
            template_match=self.template_match,
            tokens_match=self.tokens_match,
            first_diff_json=(
                None if self.first_diff is None else json.dumps(self.first_diff, ensure_ascii=False)
            ),
            detail=self.detail,
        )

    def describe(self) -> str:
        """One line for the log."""
        head = f"model {self.model!r} at upstream {self.upstream}"
        if self.method is not None:
            head += f" ({self.method})"
        diff = self.first_diff
        if diff is None:
            return f"{head}: {self.status}" + (f" ({self.detail})" if self.detail else "")
        what, unit = ("template differs", "char")
        if diff["part"] == "tokens":
            what, unit = ("tokens differ", "token")
        return (
            f"{head}: {what} in sample {diff['sample']} at {unit} "
            f"{diff['position']}: kvern {diff['kvern']!r} vs upstream {diff['upstream']!r}"
            + (f" ({self.detail})" if self.detail else "")
        )


def _render_all(
    tokenizer: ModelTokenizer, chats: Sequence[list[dict[str, Any]]]
) -> list[PromptTokens]:
    return [tokenizer.chat(chat) for chat in chats]


async def check_parity(
    client: httpx.AsyncClient,
    upstream: Upstream,
    model: str,
    tokenizer: ModelTokenizer,
    *,
    samples: list[list[dict[str, Any]]] | None = None,
    run_sync: RunSync | None = None,
    clock: Callable[[], float] = time.time,
    timeout_s: float = 10.0,
) -> ParityReport:
    """Compare kvern's rendering and tokenization of ``samples`` with the upstream's.

    Never raises for anything the upstream does; the report says what happened.
    ``run_sync`` runs kvern's rendering off the event loop (default: a worker
    thread); ``samples`` defaults to :func:`default_samples`.
    """
    chats = default_samples() if samples is None else samples
    if not chats:
        raise ValueError("samples must hold at least one chat")

    def report(status: ParityStatus, **fields: Any) -> ParityReport:
        return ParityReport(
            model=model, upstream=upstream.name, status=status, checked_at_s=clock(), **fields
        )

    if tokenizer.kind == "fallback":
        return report(
            "skipped_fallback",
            method=None,
            detail=f"kvern uses its approximate tokenizer ({tokenizer.error or 'no tokenizer'})",
        )
    try:
        ours: list[PromptTokens] = await (run_sync or asyncio.to_thread)(
            _render_all, tokenizer, chats
        )
    except Exception as exc:  # noqa: BLE001 - reported, never raised
        return report("error", method=None, detail=f"kvern could not render: {exc!r}"[:500])
    notes = [
        f"kvern's template failed on sample {i} ({p.template_error}); compared its fallback"
        for i, p in enumerate(ours)
        if not p.used_model_template
    ]
    probe = Probe(client, upstream, model, timeout_s)
    try:
        first = await probe.llamacpp_template(chats[0])
        if first.status_code in NO_ENDPOINT:
            outcome = await compare_vllm(probe, tokenizer, chats, ours, notes)
        else:
            outcome = await compare_llamacpp(probe, tokenizer, chats, ours, first, notes)
    except Unsupported as exc:
        return report("unsupported", method=None, detail=str(exc))
    except (ProbeError, KvernError) as exc:
        return report("error", method=None, detail=str(exc)[:500])
    matched = outcome.template_match is not False and outcome.tokens_match
    return report(
        "match" if matched else "mismatch",
        method=outcome.method,
        template_match=outcome.template_match,
        tokens_match=outcome.tokens_match,
        first_diff=outcome.first_diff,
        detail=outcome.detail,
    )


class ParityChecker:
    """Checks each model once, in the background, and keeps the latest report per model.

    Fed by the tokenizer registry's ``on_loaded`` hook (a model is checked the
    first time its tokenizer is ready, never on a request's path) and by
    :meth:`start` for the exact model names of the configuration. A check
    that ends in ``error`` (the upstream not up yet, say) is retried after each
    of ``retry_delays_s``; reports are kept for /health and written to the
    analytics store.
    """

    def __init__(
        self,
        *,
        client: httpx.AsyncClient,
        upstream: Upstream,
        store: AnalyticsStore | None = None,
        run_sync: RunSync | None = None,
        clock: Callable[[], float] = time.time,
        timeout_s: float = 10.0,
        retry_delays_s: Sequence[float] = (5.0, 30.0, 120.0),
        samples: list[list[dict[str, Any]]] | None = None,
        on_report: Callable[[ParityReport, bool], None] | None = None,
    ) -> None:
        """``on_report(report, final)`` sees every report; with it, the checker logs none.

        (The brain hands its reports to the relay, which stores and logs them.)
        """
        self._client = client
        self._upstream = upstream
        self._store = store
        self._run_sync = run_sync
        self._clock = clock
        self._timeout_s = timeout_s
        self._retry_delays_s = tuple(retry_delays_s)
        self._samples = samples
        self._on_report = on_report
        self._seen: set[str] = set()  # models scheduled or checked
        self._reports: dict[str, ParityReport] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def on_loaded(self, model: str, tokenizer: ModelTokenizer) -> None:
        """The registry hook: schedule ``model``'s check unless it was scheduled before."""
        if self._closed or model in self._seen:
            return
        self._seen.add(model)
        self._spawn(self._run(model, tokenizer))

    def start(self, registry: TokenizerRegistry, models: Iterable[str]) -> None:
        """Load and check, in the background, every name in ``models`` that is not a glob."""
        names = [m for m in models if not is_glob(m)]
        if names and not self._closed:
            self._spawn(self._check_names(registry, names))

    def reports(self) -> dict[str, ParityReport]:
        """The latest report per model name, in name order."""
        return dict(sorted(self._reports.items()))

    async def wait(self) -> None:
        """Return once no check is running or scheduled (tests, tools)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Stop: no new checks; the running ones are cancelled."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name="kvern-parity")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check_names(self, registry: TokenizerRegistry, names: list[str]) -> None:
        for name in names:
            try:
                tokenizer = await registry.get(name)
            except Exception as exc:  # noqa: BLE001 - start-up checks are advice
                logger.warning("parity check for %r: tokenizer did not load: %r", name, exc)
                continue
            self.on_loaded(name, tokenizer)  # no-op if the registry's hook came first

    async def _run(self, model: str, tokenizer: ModelTokenizer) -> None:
        delays = iter(self._retry_delays_s)
        while True:
            try:
                report = await check_parity(
                    self._client,
                    self._upstream,
                    model,
                    tokenizer,
                    samples=self._samples,
                    run_sync=self._run_sync,
                    clock=self._clock,
                    timeout_s=self._timeout_s,
                )
            except Exception as exc:  # noqa: BLE001 - a check never fails the proxy
                report = ParityReport(
                    model,
                    self._upstream.name,
                    None,
                    "error",
                    checked_at_s=self._clock(),
                    detail=f"parity check failed: {exc!r}"[:500],
                )
            if self._store is not None:
                await self._store.write_parity(report.to_row())
            self._reports[model] = report  # after the row: in /health means in the store
            delay = next(delays, None) if report.status == "error" else None
            if self._on_report is not None:
                self._on_report(report, delay is None)
            if delay is None:
                if self._on_report is None:
                    log_report(report)
                return
            logger.info("parity %s; retrying in %.0f s", report.describe(), delay)
            await asyncio.sleep(delay)


def log_report(report: ParityReport) -> None:
    if report.status == "mismatch":
        logger.warning(
            "parity MISMATCH for %s; kvern's cache figures for this model may be wrong",
            report.describe(),
        )
    elif report.status == "error":
        logger.warning("parity check could not run for %s", report.describe())
    else:
        logger.info("parity for %s", report.describe())
