"""Which tokenizer a request's model gets: request model name -> :class:`ModelTokenizer`.

For every request kvern must produce the ids the backend's KV cache is keyed
by: normalize message text, render with the model's chat template, normalize
the rendered prompt, tokenize (incrementally where that is exact; see
:mod:`kvern.tokenize.model_tokenizer`). The :class:`TokenizerRegistry` maps
model names to tokenizers through the config's model map (exact names and
globs, so Ollama tags such as ``llama3.2:3b`` resolve), loads each tokenizer
once, lazily and off the event loop. A model with no tokenizer of its own
(none configured, or its load failed) is tokenized by the upstream when the
upstream can (llama.cpp's ``/apply-template`` + ``/tokenize``, vLLM's
``/tokenize``), which is exact; only when it cannot does kvern use a clearly
labelled approximate tokenizer, logged as an error, so tracking never stops.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from kvern.config import TokenizerEntry, TokenizersConfig
from kvern.tokenize.hub import HubProbe, HubUnreachable, is_hub_id
from kvern.tokenize.model_tokenizer import ModelTokenizer
from kvern.tokenize.upstream import (
    UPSTREAM_SOURCE,
    UpstreamTokenizerError,
    upstream_model_tokenizer,
)

logger = logging.getLogger(__name__)

# What /health reports: a tokenizer still loading has no kind yet.
TokenizerStateKind = Literal["exact", "fallback", "loading"]


@dataclass(slots=True)
class TokenizerState:
    """What /health reports per model."""

    model: str  # request model name
    kind: TokenizerStateKind  # exact, fallback, or still loading
    source: str | None  # where the tokenizer came from
    incremental: bool  # segment cache on
    error: str | None = None  # why the fallback is in use, or why incremental is off
    verify_skipped: int = 0  # sampled checks skipped: the prompt was over verify_max_chars


def _load_template(value: str) -> str:
    """A template override is either a path to a file or the template text itself."""
    if "{%" in value or "{{" in value:
        return value
    path = Path(value).expanduser()
    return path.read_text(encoding="utf-8")


def load_hf_tokenizer(entry: TokenizerEntry, hub: HubProbe | None = None) -> Any:
    """Load a transformers tokenizer for ``entry`` (hub id, local directory or .gguf file).

    With ``hub``, a hub id is fetched only when the hub answered its one
    probe; otherwise only the local cache is read (no network, no retries),
    and :class:`HubUnreachable` says so when the tokenizer is not there.
    """
    source = entry.source
    if source.endswith(".gguf"):
        from kvern.tokenize.gguf import build_tokenizer_from_gguf

        tokenizer = build_tokenizer_from_gguf(source)
    else:
        from transformers import AutoTokenizer

        status = hub.check() if hub is not None and is_hub_id(source) else None
        if status is not None and status.state == "unreachable":
            try:
                tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            except OSError:
                raise HubUnreachable(
                    f"hub unreachable: {status.endpoint} ({status.error}); "
                    f"{source!r} is not in the local cache"
                ) from None
        else:
            tokenizer = AutoTokenizer.from_pretrained(source)
    if entry.chat_template:
        tokenizer.chat_template = _load_template(entry.chat_template)
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"{source}: not a fast (Rust) tokenizer; kvern needs tokenizer.json")
    return tokenizer


HFLoader = Callable[[TokenizerEntry], Any]
# (request model name, its tokenizer), once the tokenizer is ready.
OnLoaded = Callable[[str, ModelTokenizer], None]


@dataclass(slots=True)
class _Slot:
    """One model's tokenizer, loaded or loading."""

    future: asyncio.Future[ModelTokenizer] | None = None  # loading or done
    value: ModelTokenizer | None = None  # set once loaded
    models: set[str] = field(default_factory=set)  # request names resolved to it


class TokenizerRegistry:
    """Resolves request model names to :class:`ModelTokenizer`, loading each once.

    Loads run in a worker thread (``asyncio.to_thread``) because building a
    tokenizer takes from 0.3 s (tokenizer.json) to several seconds (GGUF), and
    the event loop is forwarding other users' requests meanwhile. They run one
    at a time: transformers' lazy imports are not thread-safe on first use (two
    first loads at once gave ``ImportError: cannot import name 'AutoTokenizer'``),
    and loads are CPU work that would share one GIL anyway.
    """

    def __init__(
        self,
        config: TokenizersConfig,
        *,
        loader: HFLoader | None = None,
        hub: HubProbe | None = None,
        on_loaded: OnLoaded | None = None,
        upstream_origin: str | None = None,
    ) -> None:
        """``upstream_origin``: where models with ``source: upstream`` are tokenized.

        ``loader`` replaces the transformers loader (tests); without one, hub
        ids are loaded behind ``hub`` (by default a probe of huggingface_hub's
        configured endpoint), which /health reports.
        """
        self._config = config
        self._upstream_origin = upstream_origin
        if loader is None:
            hub = hub or HubProbe()
            loader = partial(load_hf_tokenizer, hub=hub)
        self.hub = hub
        self._loader = loader
        self._load_lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        # Called on the event loop, once per model name, when :meth:`get` first
        # has that name's tokenizer ready (the parity check hooks in here).
        # Exceptions it raises are logged, never passed to the caller of get().
        self.on_loaded = on_loaded
        self._notified: set[str] = set()
        # Called on the event loop after each load :meth:`get` ran, whoever
        # asked first (a request, the start-up parity check): the brain puts
        # what the load built -- transformers' modules, the vocabulary --
        # out of the garbage collector's sight there.
        self.after_load: Callable[[], None] | None = None
        self._verify_every = (
            0 if config.verify_sample_rate == 0 else max(1, round(1 / config.verify_sample_rate))
        )

    def _key(self, model: str) -> tuple[str, TokenizerEntry | None]:
        found = self._config.entry_for(model)
        if found is None:
            return f"fallback:{model}", None
        pattern, entry = found
        return f"entry:{pattern}", entry

    def _build(self, model: str, entry: TokenizerEntry | None) -> ModelTokenizer:
        if entry is None:
            return self._instead(model, None, f"no tokenizer configured for model {model!r}")
        if entry.source == UPSTREAM_SOURCE:
            if self._upstream_origin is None:
                return self._approximate(model, entry.source, "no upstream to ask")
            return upstream_model_tokenizer(self._upstream_origin, model)
        try:
            with self._load_lock:
                hf = self._loader(entry)
        except Exception as exc:  # noqa: BLE001 - any load failure: the upstream, else approximate
            reason = f"loading {entry.source!r} failed: {type(exc).__name__}: {exc}"[:500]
            if isinstance(exc, HubUnreachable):
                reason = str(exc)[:500]
            return self._instead(model, entry.source, reason)
        return ModelTokenizer(
            hf,
            source=entry.source,
            cache_tokens=self._config.incremental_cache_tokens,
            cache_bytes=self._config.incremental_cache_bytes,
            verify_every=self._verify_every,
            verify_max_chars=self._config.verify_max_chars,
        )

    def _instead(self, model: str, source: str | None, reason: str) -> ModelTokenizer:
        """No tokenizer of the model's own: the upstream's if it can tokenize, else approximate.

        The upstream's is exact by construction (it is what the backend keys
        its cache with), at two small requests per tracked request; the
        approximate one is the last resort, and loudly so.
        """
        origin = self._upstream_origin
        if origin is not None:
            upstream = upstream_model_tokenizer(origin, model)
            try:
                method = upstream.upstream.probe()
            except UpstreamTokenizerError as exc:
                upstream.upstream.close()
                return self._approximate(
                    model, source, f"{reason}; the upstream cannot tokenize ({exc})"
                )
            logger.warning(
                "tokenizer for %s: %s; tokenizing with the upstream instead (%s, exact)",
                model,
                reason,
                method,
            )
            upstream.error = f"{reason}; tokenized by the upstream ({method}) instead"
            return upstream
        return self._approximate(model, source, reason)

    def _approximate(self, model: str, source: str | None, reason: str) -> ModelTokenizer:
        logger.error(
            "tokenizer for %s: %s; using the APPROXIMATE tokenizer: this model's token "
            "counts and cache figures are estimates (flagged in /health and /analytics)",
            model,
            reason,
        )
        return ModelTokenizer(
            None,
            source=source,
            error=reason,
            cache_tokens=self._config.incremental_cache_tokens,
            verify_every=self._verify_every,
            verify_max_chars=self._config.verify_max_chars,
        )

    def loaded(self, model: str) -> ModelTokenizer | None:
        """The model's tokenizer if it is already loaded, without loading it."""
        key, _ = self._key(model)
        slot = self._slots.get(key)
        if slot is None or slot.value is None:
            return None
        slot.models.add(model)
        return slot.value

    def get_sync(self, model: str) -> ModelTokenizer:
        """Resolve and load in the calling thread (tests, tools, benchmarks)."""
        key, entry = self._key(model)
        slot = self._slots.setdefault(key, _Slot())
        slot.models.add(model)
        if slot.value is None:
            slot.value = self._build(model, entry)
        return slot.value

    async def get(self, model: str) -> ModelTokenizer:
        """Resolve and, the first time, load off the event loop; concurrent callers share it."""
        key, entry = self._key(model)
        slot = self._slots.setdefault(key, _Slot())
        slot.models.add(model)
        if slot.value is not None:
            return self._loaded(model, slot.value)
        if slot.future is None:
            # The load is a task of its own: a caller that is cancelled (a
            # parity check stopped at shutdown) must not cancel it for the
            # other callers waiting on the same load.
            slot.future = asyncio.ensure_future(self._load(slot, model, entry))
        return self._loaded(model, await asyncio.shield(slot.future))

    async def _load(self, slot: _Slot, model: str, entry: TokenizerEntry | None) -> ModelTokenizer:
        try:
            value = await asyncio.to_thread(self._build, model, entry)
        except BaseException:
            slot.future = None  # the next caller tries again
            raise
        slot.value = value
        if self.after_load is not None:
            try:
                self.after_load()
            except Exception:  # noqa: BLE001 - a listener must not fail tokenizer lookups
                logger.exception("after_load callback failed for model %s", model)
        return value

    def _loaded(self, model: str, value: ModelTokenizer) -> ModelTokenizer:
        """Tell ``on_loaded``, the first time only, that ``model``'s tokenizer is ready."""
        if self.on_loaded is not None and model not in self._notified:
            self._notified.add(model)
            try:
                self.on_loaded(model, value)
            except Exception:  # noqa: BLE001 - a listener must not fail tokenizer lookups
                logger.exception("on_loaded callback failed for model %s", model)
        return value

    def states(self) -> list[TokenizerState]:
        """Per requested model: exact or fallback, source, incremental state, error."""
        out: list[TokenizerState] = []
        for slot in self._slots.values():
            tok = slot.value
            if tok is None:
                out.extend(TokenizerState(m, "loading", None, False) for m in slot.models)
                continue
            reason = tok.error
            if reason is None and tok.segments is not None and not tok.segments.enabled:
                reason = f"incremental off: {tok.segments.disabled_reason}"
            skipped = tok.segments.stats.num_verify_skipped if tok.segments is not None else 0
            for model in sorted(slot.models):
                out.append(
                    TokenizerState(model, tok.kind, tok.source, tok.incremental, reason, skipped)
                )
        return sorted(out, key=lambda s: s.model)
