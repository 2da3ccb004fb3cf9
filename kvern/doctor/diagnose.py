"""The doctor's checks of a valid configuration, in the order the report shows them.

Why this order: each step reads what the ones before found. This machine
first (no network); then the upstreams (reachable, what they list and are),
which decide which models to check and where parity and the cached-token
requests go; then the tokenizer hub, which decides how hub ids load; then
each model's tokenizer, followed at once by its parity, so a slow load is
seen before the next one begins; then the shared state of several instances;
last the inference requests. Every line is printed when its check ends.

Why the KV events lines come in two parts, around the cached-token check:
the doctor's own requests are what makes an upstream publish events, so the
subscription must be open before they go out and is read after they end
(:class:`kvern.doctor.kv_events_checks.KvEventsWatch`). The watch is closed in
a ``finally``, so a failing check in between leaves no socket open.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx

from kvern.config import KvernConfig
from kvern.doctor.kv_events_checks import KvEventsWatch
from kvern.doctor.local_checks import ExposureWarning, check_local
from kvern.doctor.parity_checks import check_model_parity
from kvern.doctor.report import Progress, Report
from kvern.doctor.shared_state_checks import check_shared_state
from kvern.doctor.tokenizer_checks import check_hub, check_model, models_to_check, unconfigured
from kvern.doctor.upstream_checks import check_upstreams, findings_for
from kvern.doctor.usage_checks import check_cached_tokens
from kvern.tokenize.hub import HubProbe
from kvern.tokenize.registry import TokenizerRegistry


@dataclass(frozen=True, slots=True)
class Options:
    """The doctor's own switches (see :func:`kvern.doctor.cli.add_arguments`)."""

    send_requests: bool = True  # the cached-token check sends two 1-token chats per upstream
    timeout_s: float = 60.0  # longest wait for one upstream answer (parity, requests)
    api_key: str | None = None  # bearer key sent to the upstreams
    hub: HubProbe | None = None  # tests: a probe of their own; default huggingface_hub's


async def diagnose(
    config: KvernConfig,
    report: Report,
    progress: Progress,
    exposure_warning: ExposureWarning,
    options: Options,
) -> None:
    """Run every check after the configuration's, adding each line to ``report``.

    A check that raises is reported as a failure of its own part; the rest still run.
    """
    with report.guard("this machine"):
        report.extend(await asyncio.to_thread(check_local, config, exposure_warning))
    headers = {"authorization": f"Bearer {options.api_key}"} if options.api_key else None
    timeout = httpx.Timeout(options.timeout_s, connect=config.upstream.connect_timeout_s)
    async with httpx.AsyncClient(
        timeout=timeout, headers=headers, trust_env=False, follow_redirects=False
    ) as client:
        upstreams = findings_for(config)  # none reachable, unless the check says so
        with report.guard("upstreams"):
            upstreams, checks = await check_upstreams(
                config, client, timeout_s=config.routing.health.timeout_s
            )
            report.extend(checks)
        hub = options.hub or HubProbe()
        with report.guard("tokenizer hub"):
            report.add(await asyncio.to_thread(check_hub, config, hub, progress))
        registry = TokenizerRegistry(config.tokenizers, hub=hub)
        first = upstreams[0] if upstreams else None
        for found in models_to_check(config, upstreams):
            with report.guard(f"tokenizer for {found.model}"):
                report.add(await check_model(found, registry, first, progress))
                report.extend(
                    await check_model_parity(
                        client, found, upstreams, progress, timeout_s=options.timeout_s
                    )
                )
        with report.guard("models without a tokenizer"):
            report.extend(await asyncio.to_thread(unconfigured, config, upstreams))
        with report.guard("shared state"):
            report.extend(await check_shared_state(config.routing, timeout_s=options.timeout_s))
        watch = KvEventsWatch(
            client,
            upstreams,
            listen=options.send_requests,
            timeout_s=options.timeout_s,
            connect_timeout_s=config.upstream.connect_timeout_s,
        )
        try:
            with report.guard("kv events"):
                report.extend(await watch.start())
            with report.guard("cached tokens"):
                report.extend(
                    await check_cached_tokens(
                        client,
                        config,
                        upstreams,
                        progress,
                        send=options.send_requests,
                        timeout_s=options.timeout_s,
                    )
                )
            with report.guard("kv events"):
                report.extend(await watch.finish())
        finally:
            await watch.close()
