"""Doctor: the tokenizer hub, and whether each model's tokenizer loads and is exact.

Why through kvern's own :class:`~kvern.tokenize.registry.TokenizerRegistry`:
it is what the brain loads tokenizers with (hub probe, local cache only when
the hub is unreachable, GGUF rebuilds, template overrides), so a tokenizer
the doctor calls exact is one kvern will get. The registry is built without
an upstream to fall back on, so a source that does not load shows as such
instead of being rescued silently; what kvern would then do -- ask the first
upstream to tokenize (exact, two requests per tracked request) or use its
approximate tokenizer (estimates) -- is asked of the upstream and said on the
same line.

Glob keys (``llama3*``) are checked with a name the upstreams list that
resolves to them, so parity can use it; with none, with the pattern itself.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from kvern.config import KvernConfig, TokenizerEntry
from kvern.doctor.report import Check, Progress, fail, ok, warn
from kvern.doctor.upstream_checks import UpstreamFindings
from kvern.parity.checker import is_glob
from kvern.tokenize.hub import HubProbe, is_hub_id
from kvern.tokenize.model_tokenizer import ModelTokenizer
from kvern.tokenize.registry import TokenizerRegistry
from kvern.tokenize.upstream import UPSTREAM_SOURCE, UpstreamTokenizer, UpstreamTokenizerError

_HUB = "tokenizer hub"


@dataclass(slots=True)
class ModelFindings:
    """One model's tokenizer as the doctor found it (parity builds on it)."""

    model: str  # request model name (for a glob key: a listed name it matches, or the key)
    key: str  # its key in tokenizers.models
    entry: TokenizerEntry
    tokenizer: ModelTokenizer | None = None  # exact and kvern's own: parity can be checked


def hub_ids(config: KvernConfig) -> list[str]:
    """The sources that are hub ids (``upstream`` looks like one, and is not)."""
    sources = {e.source for e in config.tokenizers.models.values()} - {UPSTREAM_SOURCE}
    return sorted(s for s in sources if is_hub_id(s))


def check_hub(config: KvernConfig, probe: HubProbe, progress: Progress) -> Check:
    """The hub's state as the registry will see it; probed only when a source is a hub id."""
    ids = hub_ids(config)
    if not ids:
        return ok(_HUB, "not needed: no tokenizer source is a hub id")
    with progress.step("probing the tokenizer hub"):
        status = probe.check()
    named = ", ".join(ids)
    if status.state == "reachable":
        return ok(_HUB, f"{status.endpoint} reachable ({status.probe_ms} ms), for {named}")
    if status.state == "offline":
        return ok(_HUB, f"offline (HF_HUB_OFFLINE is set): {named} load from the local cache only")
    return warn(
        _HUB,
        f"{status.endpoint} unreachable ({status.error}): {named} load from the local cache only",
        "map them to a local directory or .gguf file, or set HF_HUB_OFFLINE=1 to skip the probe",
    )


def models_to_check(config: KvernConfig, upstreams: list[UpstreamFindings]) -> list[ModelFindings]:
    """Every key of ``tokenizers.models``, with the request name to check it under."""
    listed = [m for u in upstreams for m in (u.models or [])]
    out: list[ModelFindings] = []
    for key, entry in config.tokenizers.models.items():
        name = key
        if is_glob(key):
            resolved = (m for m in listed if config.tokenizers.entry_for(m) == (key, entry))
            name = next(resolved, key)
        out.append(ModelFindings(model=name, key=key, entry=entry))
    return out


def _upstream_method(upstream: UpstreamFindings | None, model: str) -> tuple[str | None, str]:
    """(the tokenizer API the upstream speaks for ``model``, or None; why it speaks none)."""
    if upstream is None or not upstream.reachable:
        return None, "the upstream is unreachable"
    asker = UpstreamTokenizer(upstream.upstream.origin, model, timeout_s=5.0)
    try:
        return asker.probe(), ""
    except UpstreamTokenizerError as exc:
        return None, f"upstream {upstream.upstream.name} cannot tokenize ({exc})"
    finally:
        asker.close()


_APPROXIMATE = "kvern would use its APPROXIMATE tokenizer (figures are estimates)"


def _rescue(upstream: UpstreamFindings | None, model: str) -> str:
    """What kvern does for a model with no tokenizer of its own (the registry's ``_instead``)."""
    method, why = _upstream_method(upstream, model)
    if method is None or upstream is None:
        return f"{why}, so {_APPROXIMATE}"
    return (
        f"kvern would ask upstream {upstream.upstream.name} to tokenize instead ({method} API: "
        "exact, 2 requests per tracked request)"
    )


def _template_note(tokenizer: ModelTokenizer, entry: TokenizerEntry) -> str | None:
    """Where the chat template comes from, or None when there is none."""
    if tokenizer.hf is None or not getattr(tokenizer.hf, "chat_template", None):
        return None
    return "override" if entry.chat_template else "the tokenizer's own"


def _short(reason: str | None, limit: int = 240) -> str:
    """A load error's first sentence (transformers' run on for several), whitespace folded."""
    text = " ".join((reason or "it did not load").split())
    head, dot, _ = text.partition(". ")
    text = head if dot and len(head) >= 40 else text
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def check_model(
    found: ModelFindings,
    registry: TokenizerRegistry,
    first: UpstreamFindings | None,
    progress: Progress,
) -> Check:
    """Load one model's tokenizer (in a worker thread, as kvern does) and say what it is."""
    subject = f"tokenizer for {found.model}"
    key = f"tokenizers.models.{found.key}"
    source = found.entry.source
    if source == UPSTREAM_SOURCE:
        method, why = await asyncio.to_thread(_upstream_method, first, found.model)
        if method is not None and first is not None:
            return ok(
                subject,
                f"source: upstream: exact, tokenized by upstream {first.upstream.name} "
                f"({method} API, 2 requests per tracked request)",
            )
        return fail(
            subject,
            f"source: upstream, but {why}, so {_APPROXIMATE}",
            f"start the upstream, or set {key}.source to a local directory or .gguf file",
        )
    with progress.step(f"loading tokenizer for {found.model} from {source}"):
        tokenizer = await asyncio.to_thread(registry.get_sync, found.model)
    if tokenizer.kind != "exact" or tokenizer.hf is None:
        said = await asyncio.to_thread(_rescue, first, found.model)
        fix = f"make {key}.source load here: a local directory with tokenizer.json, or a .gguf"
        if is_hub_id(source):
            fix = (
                f"download {source} into the HF cache while online (huggingface-cli download), "
                f"or set {key}.source to a local directory or .gguf file"
            )
        return fail(subject, f"{_short(tokenizer.error)}; {said}", fix)
    template = _template_note(tokenizer, found.entry)
    vocab = f"{len(tokenizer.hf)} tokens"
    if template is None:
        return warn(
            subject,
            f"exact ({source}, {vocab}) but it has no chat template: kvern renders chats "
            "generically, unlike the backend",
            f"set {key}.chat_template (a .jinja file or the template text)",
        )
    found.tokenizer = tokenizer
    return ok(subject, f"exact ({source}, {vocab}, chat template: {template})")


def unconfigured(config: KvernConfig, upstreams: list[UpstreamFindings]) -> list[Check]:
    """Models an upstream lists that no key of ``tokenizers.models`` covers."""
    checks: list[Check] = []
    seen: set[str] = set()
    first = upstreams[0] if upstreams else None
    for upstream in upstreams:
        for model in upstream.models or []:
            if model in seen or config.tokenizers.entry_for(model) is not None:
                continue
            seen.add(model)
            said = _rescue(first, model)
            checks.append(
                warn(
                    f"tokenizer for {model}",
                    f"listed by upstream {upstream.upstream.name}, but none is configured; {said}",
                    f"map {model!r} in tokenizers.models (a local directory, a .gguf file, "
                    "or source: upstream)",
                )
            )
    return checks
