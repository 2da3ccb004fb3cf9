"""One model's tokenizer: a request's prompt -> the token ids the backend keys its KV cache by.

Why a module of its own: the registry (which tokenizer a model name gets,
loading it once) and the upstream-asking tokenizer both build on this class,
and neither should import the other to get it. A :class:`ModelTokenizer`
renders with the model's chat template, applies the normalization rules and
tokenizes, incrementally where that is exact; with no tokenizer it falls back
to an approximate one and labels every result ``fallback``.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kvern.prompt.normalize import Normalizer
from kvern.prompt.render import prepare_messages, render_chat, render_generic
from kvern.prompt.requests import RequestPrompt
from kvern.tokenize.fallback import ApproximateTokenizer
from kvern.tokenize.incremental import SegmentTokenizer

TokenizerKind = Literal["exact", "fallback"]


@dataclass(slots=True)
class PromptTokens:
    """The token ids of one request's prompt and how they were obtained."""

    ids: array[int]  # token ids ('i' array), after normalization
    kind: TokenizerKind  # "exact": the model's tokenizer; "fallback": approximate
    used_model_template: bool  # False: generic rendering (no template, or it raised)
    num_ignored_parts: int  # non-text content parts left out of the rendering
    incremental: bool  # ids came from the segment cache (verified exact)
    template_error: str | None = None  # why the model's template was not used
    text: str = ""  # the normalized rendered prompt
    render_s: float = 0.0  # time spent rendering and normalizing (the rest is tokenizing)
    # The chat as rendered (normalized, template-shaped) and its tools: where a
    # divergence falls is found in them (kvern.diagnosis.layout).
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None




class ModelTokenizer:
    """One resolved tokenizer: render + normalize + tokenize for a model."""

    def __init__(
        self,
        hf_tokenizer: Any | None,
        *,
        source: str | None,
        error: str | None = None,
        cache_tokens: int = 2_000_000,
        cache_bytes: int = 32 * 1024 * 1024,
        verify_every: int = 100,
        verify_max_chars: int = 200_000,
    ) -> None:
        self.hf = hf_tokenizer
        self.source = source
        self.error = error
        self.kind: TokenizerKind = "exact" if hf_tokenizer is not None else "fallback"
        self._approx = ApproximateTokenizer() if hf_tokenizer is None else None
        self.segments: SegmentTokenizer | None = None
        if hf_tokenizer is not None:
            self.segments = SegmentTokenizer(
                hf_tokenizer.backend_tokenizer,
                cache_tokens=cache_tokens,
                cache_bytes=cache_bytes,
                verify_every=verify_every,
                verify_max_chars=verify_max_chars,
            )

    @property
    def incremental(self) -> bool:
        return self.segments is not None and self.segments.enabled

    def encode_prompt(self, text: str) -> tuple[array[int], bool]:
        """Token ids of an already rendered prompt (chat templates include BOS themselves)."""
        if self._approx is not None:
            return self._approx.encode(text), False
        assert self.segments is not None
        return self.segments.encode(text)

    def chat(
        self,
        messages: Sequence[Any],
        *,
        tools: list[dict[str, Any]] | None = None,
        normalizer: Normalizer | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> PromptTokens:
        """Tokens of a chat request's prompt, as the backend renders and tokenizes it."""
        started = time.perf_counter()
        norm = normalizer or Normalizer()
        prepared = prepare_messages(norm.messages(messages) if not norm.is_empty else messages)
        err: str | None
        if self.hf is None:
            text, used, err = render_generic(prepared.messages), False, "no tokenizer"
        else:
            rendered = render_chat(
                self.hf, prepared.messages, tools=tools, template_kwargs=template_kwargs
            )
            text, used, err = rendered.text, rendered.used_model_template, rendered.error
        text = norm.prompt(text)
        render_s = time.perf_counter() - started
        ids, incremental = self.encode_prompt(text)
        return PromptTokens(
            ids=ids,
            kind=self.kind,
            used_model_template=used,
            num_ignored_parts=prepared.num_ignored_parts,
            incremental=incremental,
            template_error=err,
            text=text,
            render_s=render_s,
            messages=prepared.messages,
            tools=tools,
        )

    def char_of_token(self, text: str, ids: Sequence[int], k: int) -> int:
        """Where token ``k`` of a rendered prompt starts in its ``text`` (``ids``: its tokens).

        Decoding the ids before it gives the text before it, exact for a
        tokenizer that decodes what it encoded; the segment cache lets only
        the segment holding ``k`` be decoded.
        """
        if k <= 0:
            return 0
        start = self.segments.segment_at(text, k) if self.segments is not None else None
        chars, tokens = start if start is not None else (0, 0)
        return min(len(text), chars + len(self.decode(ids[tokens:k])))

    def render_without_tools(self, messages: list[dict[str, Any]]) -> str:
        """The chat rendered with no tools (the text that differs is the tools')."""
        if self.hf is None:
            return render_generic(messages)
        return render_chat(self.hf, messages, tools=None).text

    def request(
        self, prompt: RequestPrompt, *, normalizer: Normalizer | None = None
    ) -> PromptTokens:
        """Tokens of a request's prompt: a chat through the template, raw text as it is."""
        if prompt.messages is not None:
            return self.chat(prompt.messages, tools=prompt.tools, normalizer=normalizer)
        assert prompt.text is not None, "a RequestPrompt carries messages or text"
        return self.completion(prompt.text, normalizer=normalizer)

    def completion(self, prompt: str, *, normalizer: Normalizer | None = None) -> PromptTokens:
        """Tokens of a /v1/completions prompt: raw text, BOS added as the backend adds it."""
        norm = normalizer or Normalizer()
        text = norm.prompt(norm.text(prompt))
        if self.hf is None:
            assert self._approx is not None
            ids = self._approx.encode(text)
        else:
            ids = array("i", self.hf.backend_tokenizer.encode(text, add_special_tokens=True).ids)
        return PromptTokens(ids, self.kind, False, 0, False, None, text)

    def encode_text(self, text: str) -> array[int]:
        """Token ids of plain text with no special tokens (generated answers)."""
        if self._approx is not None:
            return self._approx.encode(text)
        assert self.hf is not None
        return array("i", self.hf.backend_tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (for hot prefixes); special tokens are kept visible."""
        if self._approx is not None:
            return self._approx.decode(ids)
        assert self.hf is not None  # no approximate tokenizer means a real one
        return str(self.hf.backend_tokenizer.decode(list(ids), skip_special_tokens=False))

