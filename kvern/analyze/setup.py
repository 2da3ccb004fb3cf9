"""What a run of ``kvern analyze`` is set up with: tokenizers, rules, block sizes, the KV size.

Why from kvern's own config: the analysis must tokenize as ``kvern serve``
would -- the same tokenizer entries (exact names and globs), the same
normalization rules, the same block size per model -- so it takes the same
``config.yaml`` (``--config``), and each flag overrides one thing:
``--tokenizer`` every model's tokenizer, ``--rules`` the normalization rules,
``--block-size`` the backend's block, ``--model`` the model every line is
taken for.

A rules file is validated with kvern's config models, so a mistake reads as
it would at ``kvern serve`` start-up (the file, the key path, what was
expected). It holds either the ``normalization:`` mapping of config.yaml
(model glob -> rules), that mapping under a ``normalization`` key, or a
plain list of rules for every model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvern.config import (
    ConfigError,
    KvernConfig,
    NormalizationRule,
    TokenizerEntry,
    parse_config,
)
from kvern.prompt.normalize import Normalizer
from kvern.tokenize.model_tokenizer import ModelTokenizer
from kvern.tokenize.registry import TokenizerRegistry

Rules = dict[str, list[NormalizationRule]]  # model name or glob -> ordered rules


def load_rules(path: Path) -> Rules:
    """The normalization rules in ``path``, validated as config.yaml's; ConfigError names why."""
    source = str(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read rules: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if isinstance(loaded, dict) and set(loaded) == {"normalization"}:
        loaded = loaded["normalization"]
    if isinstance(loaded, list):
        loaded = {"*": loaded}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{source}: expected the normalization mapping (model glob -> rules) or a list "
            f"of rules, got {loaded!r}"[:300]
        )
    return dict(parse_config({"normalization": loaded}, source=source).normalization)


def rules_for(
    rules: Mapping[str, Sequence[NormalizationRule]], model: str
) -> list[NormalizationRule]:
    """Every rule whose key matches ``model``, in order (as :meth:`KvernConfig.rules_for`)."""
    out: list[NormalizationRule] = []
    for pattern, entries in rules.items():
        if model == pattern or fnmatch.fnmatchcase(model, pattern):
            out.extend(entries)
    return out


def with_rule(
    rules: Mapping[str, Sequence[NormalizationRule]], model: str, rule: NormalizationRule
) -> Rules:
    """``rules`` with ``rule`` appended for ``model`` (its exact name), the rest as they were."""
    out = {pattern: list(entries) for pattern, entries in rules.items()}
    out.setdefault(model, []).append(rule)
    return out


@dataclass(slots=True)
class Options:
    """The flags that shape a run (each None: as the config says)."""

    model: str | None = None  # every line is taken for this model
    tokenizer: str | None = None  # every model's tokenizer: a directory, a .gguf or a hub id
    block_size: int | None = None
    rules: Rules | None = None  # instead of the config's normalization
    capacity_tokens: int | None = None  # an LRU backend cache of this many tokens per model
    kv_bytes_per_token: int | None = None  # for the capacity curve's GiB
    top: int = 10  # divergence sites shown and advised


class TokenizerFailed(ValueError):
    """``--tokenizer`` names a tokenizer that does not load."""


@dataclass(slots=True)
class Setup:
    """The run's config and options, and the tokenizers it loaded (once per model)."""

    config: KvernConfig
    options: Options
    registry: TokenizerRegistry = field(init=False)
    _loaded: dict[str, ModelTokenizer] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        tokenizers = self.config.tokenizers
        if self.options.tokenizer is not None:
            source = self.options.tokenizer
            local = Path(source).expanduser()
            if local.exists():
                source = str(local.resolve())
            entry = TokenizerEntry(source=source)
            tokenizers = tokenizers.model_copy(update={"models": {"*": entry}})
        self.registry = TokenizerRegistry(tokenizers)

    @property
    def rules(self) -> Rules:
        found = self.options.rules
        return dict(self.config.normalization) if found is None else found

    def model_of(self, asked: str) -> str:
        """The model a line is analysed as: ``--model``, else the body's own."""
        return self.options.model or asked or "-"

    def tokenizer(self, model: str) -> ModelTokenizer:
        """The model's tokenizer; an explicit ``--tokenizer`` that does not load is an error."""
        tok = self._loaded.get(model)
        if tok is None:
            tok = self._loaded[model] = self.registry.get_sync(model)
            if self.options.tokenizer is not None and tok.kind != "exact":
                raise TokenizerFailed(f"--tokenizer {self.options.tokenizer}: {tok.error}")
        return tok

    def block_size(self, model: str) -> int:
        return self.options.block_size or self.config.trie.for_model(model)[1]

    def normalizer(self, model: str, rules: Rules) -> Normalizer:
        return Normalizer.from_rules(rules_for(rules, model))

    def tokenizer_states(self) -> list[dict[str, Any]]:
        """Per model: exact or fallback, where from, and why not exact."""
        return [
            {"model": s.model, "kind": s.kind, "source": s.source, "error": s.error}
            for s in self.registry.states()
        ]
