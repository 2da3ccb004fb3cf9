"""Doctor: does kvern render and tokenize each model exactly as each upstream serving it does?

Why the parity check kvern itself runs (:func:`kvern.parity.checker.check_parity`):
its samples and its comparison (llama.cpp's ``/apply-template`` and
``/tokenize``, vLLM's ``/tokenize``) are what ``/health`` will report once kvern
runs; the doctor only runs it before kvern does, against every upstream the
model is routed to, and words the outcome with what to change.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from kvern.doctor.report import Check, Progress, fail, ok, warn
from kvern.doctor.tokenizer_checks import ModelFindings
from kvern.doctor.upstream_checks import UpstreamFindings
from kvern.parity.checker import ParityReport, check_parity, default_samples, is_glob


def _describe_diff(report: ParityReport) -> str:
    """The first difference, without the report's own "model at upstream" head."""
    said = report.describe()
    head, sep, rest = said.partition("): ")
    return rest if sep else said.partition(": ")[2]


async def served_gguf(client: httpx.AsyncClient, upstream: UpstreamFindings) -> str | None:
    """The .gguf llama-server loaded (``/props`` ``model_path``), when this machine has it too.

    kvern rebuilds a tokenizer from a .gguf file, so pointing ``source`` at the
    server's own file makes the two agree by construction.
    """
    try:
        props = (await client.get(upstream.upstream.origin + "/props", timeout=5.0)).json()
    except (httpx.HTTPError, ValueError):
        return None
    path = props.get("model_path") if isinstance(props, dict) else None
    if isinstance(path, str) and path.endswith(".gguf") and Path(path).is_file():
        return path
    return None


def _fix(report: ParityReport, key: str, gguf: str | None) -> str:
    """What to change: the template when only it differs, else the tokenizer files."""
    own = "its .gguf file" if report.method == "llamacpp" else "the model folder it loads"
    if gguf is not None:
        own = f"its .gguf file: {gguf}"
    if report.template_match is False and report.tokens_match:
        where = (
            "the template its GGUF carries (GET /props: chat_template)"
            if report.method == "llamacpp"
            else "the backend's chat template"
        )
        return f"set {key}.chat_template to {where}, or remove an override that differs"
    if report.template_match is False:
        return (
            f"set {key}.source to the backend's own tokenizer ({own}): template and tokens differ"
        )
    return f"set {key}.source to the backend's own tokenizer ({own})"


def parity_check(
    report: ParityReport,
    found: ModelFindings,
    upstream: UpstreamFindings,
    gguf: str | None = None,
) -> Check:
    """One report as a line of the doctor's (``gguf``: the server's model file, found here)."""
    subject = f"parity of {found.model} with {upstream.upstream.name}"
    key = f"tokenizers.models.{found.key}"
    if report.status == "match":
        what = "template and tokens" if report.template_match else "tokens"
        samples = len(default_samples())
        return ok(subject, f"{what} match ({report.method}, {samples} sample chats)")
    if report.status == "mismatch":
        return fail(
            subject,
            f"MISMATCH: {_describe_diff(report)}; kvern's cache figures for it would be wrong",
            _fix(report, key, gguf),
        )
    if report.status == "unsupported":
        return warn(
            subject,
            f"cannot be compared: {report.detail}",
            f"make sure {key} is the very tokenizer and template the backend loads",
        )
    if report.status == "skipped_fallback":
        return warn(subject, f"not compared: {report.detail}", "fix the tokenizer first")
    return fail(
        subject,
        f"the check could not run: {report.detail}",
        "check that the upstream serves this model name, and its log",
    )


async def check_model_parity(
    client: httpx.AsyncClient,
    found: ModelFindings,
    upstreams: list[UpstreamFindings],
    progress: Progress,
    *,
    timeout_s: float,
) -> list[Check]:
    """A model with an exact tokenizer of kvern's own, against each upstream serving it."""
    tokenizer = found.tokenizer
    if tokenizer is None:
        return []  # its tokenizer line already says why
    if is_glob(found.model):
        return [
            warn(
                f"parity of {found.key}",
                "not compared: no model the upstreams list matches this pattern",
                "check the pattern against the upstreams' model names",
            )
        ]
    checks: list[Check] = []
    for upstream in upstreams:
        if not upstream.reachable or not upstream.serves(found.model):
            continue
        if found.model == found.key and upstream.lists(found.model) is False:
            checks.append(
                warn(
                    f"model {found.model}",
                    f"not in upstream {upstream.upstream.name}'s model list "
                    f"({', '.join(upstream.models or [])}); requests for it may be refused",
                    "correct the name in tokenizers.models, or serve the model there",
                )
            )
        with progress.step(f"checking parity of {found.model} with {upstream.upstream.name}"):
            report = await check_parity(
                client, upstream.upstream, found.model, tokenizer, timeout_s=timeout_s
            )
        gguf = None
        if report.status == "mismatch" and report.method == "llamacpp":
            gguf = await served_gguf(client, upstream)
        checks.append(parity_check(report, found, upstream, gguf))
    return checks
