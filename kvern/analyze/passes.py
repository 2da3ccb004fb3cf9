"""One pass over the log: every request tokenized, matched, inserted and its tokens explained.

Per request, in log order, exactly what kvern's tracking thread does beside
a live one (:mod:`kvern.tracking.bookkeeping`): render and tokenize with the
model's tokenizer and normalization rules, insert into the model's radix
trie, ask the :class:`~kvern.tracking.divergence.DivergenceFinder` whether
and where an earlier prompt went on differently, and give every prompt
token a reason with :func:`~kvern.diagnosis.reasons.assign`.

Offline there is no backend: a token is reused when an earlier prompt shared
its whole block (the trie never forgets), unless ``--capacity-tokens`` sets
a cache size, where an LRU of that many tokens (:mod:`kvern.analyze.lru`)
decides and what it dropped is ``evicted``. ``routed_away`` and
``unreported`` need upstreams and never appear here.

Dates: a chat template that injects today's date (Llama 3.x's ``Today
Date: ...``) would render every line with the day of the analysis. A line
that says when it was sent (a capture's ``kvern.ts_s``) is rendered with
that day instead (``date_string``, in this machine's time zone), so a log
spanning days shows the divergence the backend saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvern.analyze.log import BadLines, LogFile, LogLine
from kvern.analyze.lru import LruBlocks
from kvern.analyze.setup import Rules, Setup
from kvern.analyze.sitebook import SiteBook
from kvern.analyze.tally import Tally
from kvern.config import DiagnosisConfig
from kvern.diagnosis.capacity import StackDistanceCurve, block_ids
from kvern.diagnosis.reasons import assign
from kvern.prompt.normalize import Normalizer
from kvern.tokenize.model_tokenizer import ModelTokenizer, PromptTokens
from kvern.tracking.divergence import DivergenceFinder
from kvern.trie import RadixTrie

# Called after each request: (bytes of the log read, requests so far).
OnProgress = Callable[[int, int], None]
GroupKey = tuple[str, str]  # (model, tenant)


def date_string(ts_s: float) -> str:
    """The day a Llama 3.x template renders (``strftime_now("%d %b %Y")`` on that day)."""
    return time.strftime("%d %b %Y", time.localtime(ts_s))


def tokenize(tok: ModelTokenizer, line: LogLine, normalizer: Normalizer) -> PromptTokens:
    """The line's prompt as the backend tokenized it (see the module docstring on dates)."""
    asked = line.prompt
    if asked.messages is not None:
        kwargs = {"date_string": date_string(line.ts_s)} if line.ts_s is not None else None
        return tok.chat(
            asked.messages, tools=asked.tools, normalizer=normalizer, template_kwargs=kwargs
        )
    assert asked.text is not None, "a RequestPrompt carries messages or text"
    return tok.completion(asked.text, normalizer=normalizer)


@dataclass(slots=True)
class ModelState:
    """One model's trie and what reads it, for one pass."""

    tokenizer: ModelTokenizer
    normalizer: Normalizer
    block_size: int
    finder: DivergenceFinder
    trie: RadixTrie = field(default_factory=RadixTrie)
    lru: LruBlocks | None = None
    curve: StackDistanceCurve | None = None
    template_errors: int = 0  # prompts rendered generically: the template raised
    first_template_error: str | None = None


@dataclass(slots=True)
class PassResult:
    """What one pass counted."""

    totals: Tally = field(default_factory=Tally)
    groups: dict[GroupKey, Tally] = field(default_factory=dict)
    bad: BadLines = field(default_factory=BadLines)
    sites: SiteBook | None = None
    models: dict[str, ModelState] = field(default_factory=dict)
    tenant_curves: dict[GroupKey, StackDistanceCurve] = field(default_factory=dict)
    elapsed_s: float = 0.0


def run_pass(
    log: LogFile,
    setup: Setup,
    rules: Rules,
    *,
    full: bool,
    on_progress: OnProgress | None = None,
) -> PassResult:
    """Replay ``log`` with ``rules``; ``full``: also sites, capacity curves and bad lines."""
    started = time.perf_counter()
    out = PassResult(sites=SiteBook() if full else None)
    # The finder keeps the one prompt it just located; the site book keeps the rest.
    finder_config = DiagnosisConfig.model_validate(
        {
            "enabled": full,
            "samples_per_site": 1,
            "max_sites": 1,
            "max_sample_chars": setup.config.diagnosis.max_sample_chars,
        }
    )
    for line in log.read(out.bad if full else None):
        model = setup.model_of(line.model)
        state = out.models.get(model)
        if state is None:
            state = out.models[model] = _model_state(setup, model, rules, finder_config, full)
        prompt = tokenize(state.tokenizer, line, state.normalizer)
        if prompt.template_error is not None and prompt.messages is not None:
            state.template_errors += 1
            state.first_template_error = state.first_template_error or prompt.template_error
        ids = prompt.ids
        result = state.trie.insert(ids, float(line.line_no))
        finding = state.finder.find(state.tokenizer, prompt, result)
        matched = result.matched_tokens
        aligned = RadixTrie.aligned(matched, state.block_size)
        kept = state.lru.access(ids) if state.lru is not None else None
        b = assign(
            prompt_tokens=len(ids),
            matched=matched,
            block_size=state.block_size,
            continued=finding.continued,
            reach=finding.reach,
            predicted=kept,
            reported=kept,
        )
        out.totals.add(len(ids), matched, aligned, b)
        key = (model, line.tenant)
        group = out.groups.get(key)
        if group is None:
            group = out.groups[key] = Tally()
        group.add(len(ids), matched, aligned, b)
        if full:
            _observe(out, state, key, ids, setup)
            found = finding.divergence
            if b.miss_reason == "diverged" and found is not None and out.sites is not None:
                taken = state.finder.samples.get(found.site)
                sample = taken[-1] if taken else None
                out.sites.add(model, line.tenant, found, sample, b.miss_tokens, line.line_no)
        if on_progress is not None:
            on_progress(log.bytes_read, out.totals.requests)
    out.elapsed_s = time.perf_counter() - started
    return out


def _model_state(
    setup: Setup, model: str, rules: Rules, finder_config: DiagnosisConfig, full: bool
) -> ModelState:
    block = setup.block_size(model)
    capacity = setup.options.capacity_tokens
    kv = setup.options.kv_bytes_per_token
    return ModelState(
        tokenizer=setup.tokenizer(model),
        normalizer=setup.normalizer(model, rules),
        block_size=block,
        finder=DivergenceFinder(finder_config),
        lru=LruBlocks(capacity, block) if capacity is not None else None,
        curve=StackDistanceCurve(block, kv_bytes_per_token=kv) if full else None,
    )


def _observe(
    out: PassResult, state: ModelState, key: GroupKey, ids: Sequence[int], setup: Setup
) -> None:
    """Feed the model's and the tenant's capacity curves (hashing the blocks once)."""
    assert state.curve is not None
    blocks = block_ids(ids, state.block_size)
    state.curve.add_blocks(blocks, len(ids))
    curve = out.tenant_curves.get(key)
    if curve is None:
        kv = setup.options.kv_bytes_per_token
        curve = out.tenant_curves[key] = StackDistanceCurve(state.block_size, kv_bytes_per_token=kv)
    curve.add_blocks(blocks, len(ids))
