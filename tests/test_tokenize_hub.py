"""The tokenizer hub: asked once, quickly; an unreachable hub fails every hub id fast, quietly.

No internet here, so an unreachable hub is the real situation; the tests make
it deterministic with a closed port (refused at once) or a blackhole (a
listening socket that never accepts: connects, then silence).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from kvern.config import TokenizersConfig
from kvern.tokenize.hub import HubProbe, is_hub_id
from kvern.tokenize.registry import TokenizerRegistry
from tests.servers import blackhole, free_port


def closed_port() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_sources_that_name_hub_repositories_are_told_from_local_ones(tmp_path: Path) -> None:
    assert is_hub_id("unsloth/Llama-3.2-3B-Instruct")
    assert is_hub_id("gpt2")
    assert not is_hub_id("/models/llama/tokenizer")
    assert not is_hub_id("./tokenizers/my-model")
    assert not is_hub_id("blob-sha256-abc.gguf")
    assert not is_hub_id(str(tmp_path))


def test_a_refused_hub_is_unreachable_at_once_and_says_why() -> None:
    hub = HubProbe(endpoint=closed_port(), offline=False)
    assert hub.status().state == "unchecked"
    started = time.monotonic()
    status = hub.check()
    assert time.monotonic() - started < 2.0
    assert status.state == "unreachable"
    assert status.error is not None and "ConnectError" in status.error
    assert hub.status() is status


def test_a_silent_hub_is_probed_once_within_its_timeout() -> None:
    with blackhole() as url:
        hub = HubProbe(endpoint=url, offline=False, timeout_s=0.3)
        started = time.monotonic()
        first = hub.check()
        probe_s = time.monotonic() - started
        again_started = time.monotonic()
        second = hub.check()
        again_s = time.monotonic() - again_started
    assert first.state == "unreachable" and "Timeout" in (first.error or "")
    assert probe_s < 5.0  # bounded by the timeout, not by back-off retries
    assert second is first and again_s < 0.1  # decided once for the process


def test_a_probe_under_way_shows_as_checking() -> None:
    with blackhole() as url:
        hub = HubProbe(endpoint=url, offline=False, timeout_s=1.0)
        probing = threading.Thread(target=hub.check)
        probing.start()
        deadline = time.monotonic() + 5
        while hub.status().state == "unchecked" and time.monotonic() < deadline:
            time.sleep(0.01)
        during = hub.status().state
        probing.join()
    assert during == "checking"
    assert hub.status().state == "unreachable"


def test_offline_mode_skips_the_probe() -> None:
    with blackhole() as url:
        status = HubProbe(endpoint=url, offline=True, timeout_s=30).check()
    assert status.state == "offline" and status.probe_ms is None


async def test_hub_ids_behind_an_unreachable_hub_fall_back_fast_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Repository ids no local cache holds: the fallback it is.
    config = TokenizersConfig.model_validate(
        {"models": {"llama3.2*": "kvern-tests/no-llama", "qwen*": "kvern-tests/no-qwen"}}
    )
    with blackhole() as url:
        hub = HubProbe(endpoint=url, offline=False, timeout_s=0.5)
        registry = TokenizerRegistry(config, hub=hub)
        caplog.set_level(logging.INFO)
        started = time.monotonic()
        llama = await registry.get("llama3.2:3b")
        qwen = await registry.get("qwen2.5:7b")
        elapsed_s = time.monotonic() - started
    assert llama.kind == "fallback" and qwen.kind == "fallback"
    assert elapsed_s < 10.0  # one short probe; huggingface_hub's retries took ~47 s
    states = {s.model: s for s in registry.states()}
    for model in ("llama3.2:3b", "qwen2.5:7b"):
        assert (states[model].error or "").startswith(f"hub unreachable: {url}")
    # One warning about the hub; then, with no upstream to tokenize instead,
    # one error per model naming it (issue 13: no silent fallback) -- no retries.
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    about_hub = [r for r in loud if r.name == "kvern.tokenize.hub"]
    assert len(about_hub) == 1 and url in about_hub[0].getMessage()
    per_model = [r.getMessage() for r in loud if r.name != "kvern.tokenize.hub"]
    assert len(per_model) == 2, per_model
    assert any("llama3.2:3b" in m for m in per_model) and any("qwen2.5:7b" in m for m in per_model)
    assert registry.hub is hub and hub.status().state == "unreachable"
