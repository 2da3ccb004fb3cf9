"""Tokenize by asking the upstream: exact by construction, for models with no local tokenizer.

Why: some models' tokenizers are gated, private or simply not on the proxy's
machine, while the backend serving them obviously has them. llama.cpp's
server renders chats (``/apply-template``) and tokenizes (``/tokenize``);
vLLM tokenizes whole chats (``/tokenize`` with ``messages``). Asking costs two
small requests per tracked request, made from the tracking thread, never on a
user's request path.

Select it with ``source: upstream`` for a model in ``tokenizers.models``.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any, Literal

import httpx

from kvern.prompt.normalize import Normalizer
from kvern.tokenize.fallback import ApproximateTokenizer
from kvern.tokenize.model_tokenizer import ModelTokenizer, PromptTokens

Method = Literal["llamacpp", "vllm"]


class UpstreamTokenizerError(RuntimeError):
    """The upstream cannot render or tokenize for kvern."""


class UpstreamTokenizer:
    """A synchronous client of the upstream's tokenizer endpoints (tracking thread only)."""

    def __init__(
        self,
        origin: str,
        model: str,
        *,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._client = httpx.Client(
            base_url=origin, timeout=timeout_s, transport=transport, trust_env=False
        )
        self._model = model
        self.method: Method | None = None

    def close(self) -> None:
        self._client.close()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise UpstreamTokenizerError(f"{path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise UpstreamTokenizerError(f"{path}: HTTP {response.status_code}")
        data = response.json()
        if not isinstance(data, dict):
            raise UpstreamTokenizerError(f"{path}: unexpected answer")
        return data

    def probe(self) -> Method:
        """Which tokenizer API the upstream speaks; raises when it speaks none."""
        return self._detect()

    def _detect(self) -> Method:
        """llama.cpp's API or vLLM's, told by the shape of the answer, not just a 200.

        A server that answers every POST alike (a gateway, a stub) is neither.
        """
        if self.method is None:
            probe = {"messages": [{"role": "user", "content": "x"}]}
            try:
                rendered = self._post("/apply-template", probe)
                if not isinstance(rendered.get("prompt"), str):
                    raise UpstreamTokenizerError("/apply-template: no 'prompt' in the answer")
                self.method = "llamacpp"
            except UpstreamTokenizerError:
                tokens = self._post("/tokenize", {"model": self._model, **probe}).get("tokens")
                if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                    raise UpstreamTokenizerError("/tokenize: no token ids in the answer") from None
                self.method = "vllm"
        return self.method

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        """Token ids of ``text`` (special tokens in it are parsed as such)."""
        if self._detect() == "llamacpp":
            body = {"content": text, "add_special": add_special, "parse_special": True}
            return [int(t) for t in self._post("/tokenize", body)["tokens"]]
        body = {"model": self._model, "prompt": text, "add_special_tokens": add_special}
        return [int(t) for t in self._post("/tokenize", body)["tokens"]]

    def chat(
        self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> tuple[str | None, list[int]]:
        """(rendered text if the upstream shows it, token ids) of a chat prompt."""
        if self._detect() == "llamacpp":
            body: dict[str, Any] = {"messages": list(messages)}
            if tools:
                body["tools"] = tools
            text = str(self._post("/apply-template", body)["prompt"])
            return text, self.tokenize(text)
        body = {"model": self._model, "messages": list(messages), "add_generation_prompt": True}
        if tools:
            body["tools"] = tools
        return None, [int(t) for t in self._post("/tokenize", body)["tokens"]]

    def detokenize(self, ids: Sequence[int]) -> str:
        path = "/detokenize"
        body: dict[str, Any] = {"tokens": list(ids)}
        if self._detect() == "vllm":
            body["model"] = self._model
        data = self._post(path, body)
        return str(data.get("content", data.get("prompt", "")))


UPSTREAM_SOURCE = "upstream"


class UpstreamModelTokenizer(ModelTokenizer):
    """A :class:`ModelTokenizer` whose rendering and ids come from the upstream.

    A request the upstream cannot tokenize is tracked with the approximate
    tokenizer and labelled ``fallback``, so tracking never stops.
    """

    def __init__(self, upstream: UpstreamTokenizer, *, source: str) -> None:
        super().__init__(None, source=source)
        self.kind = "exact"
        self.upstream = upstream
        self._spare = ApproximateTokenizer()

    @property
    def incremental(self) -> bool:
        return False

    def chat(
        self,
        messages: Sequence[Any],
        *,
        tools: list[dict[str, Any]] | None = None,
        normalizer: Normalizer | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> PromptTokens:
        norm = normalizer or Normalizer()
        msgs = norm.messages(messages) if not norm.is_empty else list(messages)
        try:
            text, ids = self.upstream.chat(msgs, tools)
            if text is not None and norm.prompt_rules:
                text = norm.prompt(text)
                ids = self.upstream.tokenize(text)
        except UpstreamTokenizerError as exc:
            fallback = super().chat(messages, tools=tools, normalizer=normalizer)
            fallback.kind = "fallback"
            fallback.template_error = str(exc)
            return fallback
        return PromptTokens(array("i", ids), "exact", True, 0, False, None, text or "")

    def completion(self, prompt: str, *, normalizer: Normalizer | None = None) -> PromptTokens:
        norm = normalizer or Normalizer()
        text = norm.prompt(norm.text(prompt))
        try:
            ids = array("i", self.upstream.tokenize(text, add_special=True))
        except UpstreamTokenizerError:
            return PromptTokens(
                self._spare.encode(text), "fallback", False, 0, False, None, text
            )
        return PromptTokens(ids, "exact", False, 0, False, None, text)

    def encode_text(self, text: str) -> array[int]:
        try:
            return array("i", self.upstream.tokenize(text))
        except UpstreamTokenizerError:
            return self._spare.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return self.upstream.detokenize(ids)
        except UpstreamTokenizerError:
            return "<upstream could not decode>"


def upstream_model_tokenizer(origin: str, model: str) -> UpstreamModelTokenizer:
    """A ModelTokenizer that asks the upstream at ``origin`` for ``model``'s ids."""
    source = f"{UPSTREAM_SOURCE}:{origin}"
    return UpstreamModelTokenizer(UpstreamTokenizer(origin, model), source=source)
