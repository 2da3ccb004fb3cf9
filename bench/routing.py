"""Routing across replicas: ``python bench/routing.py [--quick] [--seed N] [--json PATH]``.

What it runs, all on 127.0.0.1, each piece in its own process:

- four simulated vLLM-like replicas (``tests/replica_main.py`` around
  ``tests/replica_sim.py``): a chained-hash prefix cache of 16-token blocks with
  LRU over a fixed block budget, prefill time proportional to the prompt tokens
  not in that cache, a fixed decode time per output token, a few running
  requests at a time (the rest queue), and honest ``cached_tokens`` in usage.
  They tokenize with the real Qwen2 tokenizer and Qwen2.5 chat template -- the
  files kvern is given -- so kvern and the replicas count the same tokens;
- one router in front of them, per contender: kvern with ``routing.policy``
  ``round_robin``, ``least_load`` and ``cache_aware``; SGLang's router
  (``sglang-router``, installed on first use into its own cached venv) with
  ``--backend openai --policy cache_aware``, the configuration the issue names,
  and with its default backend (``sglang``) and ``--policy cache_aware``;
- this process: the load generator (one ``httpx.AsyncClient``).

Rows beyond the default (``--contenders``): ``kvern_cache_aware_x3`` (three
kvern instances sharing state through a redis-server, behind a round-robin
client), ``kvern_cache_aware_x3_unshared`` (the same without shared state) and
``kvern_cache_aware_events`` (presence from the replicas' own KV events, which
that row's replicas publish in vLLM's form, instead of kvern's model). Each
kvern row is a :class:`KvernSetup` in ``KVERN_SETUPS``.

Every contender gets fresh replicas (empty caches, zeroed counters) and the same
trace (``bench/routing_trace.py``): multi-tenant chat sessions, Zipf tenant
popularity, Poisson session arrivals near the replicas' capacity, each turn sent
once the previous answer has arrived and carrying it. One replica's cache holds
about half of all tenants' system prompts, so the four together hold them all
only if each tenant's traffic stays on few replicas.

How to read the table, one row per contender:

- ``prefill``: prompt tokens the replicas computed (their ``/metrics-json``) --
  the GPU work a router can save; ``hit``: cached / prompt tokens, as the
  replicas reported them;
- ``ttft p50``/``p99``: time to the first content token, measured here, in ms;
- ``req/s``, ``ptok/s``: completed requests and prompt tokens per second of run;
- ``ok``, ``fail``: completed and failed requests (errors, timeouts, cut at the
  drain deadline); ``unsent``: turns never sent because their session failed;
- ``util``: simulated busy time / (replicas x slots x run time); near 1 = full;
  ``queue``: mean ms a request waited at its replica for a running slot;
- ``pf max/min``, ``req max/min``: most over least loaded replica, by computed
  prefill tokens and by requests (1.00 = even);
- ``evicted``: blocks the replicas' caches evicted (thrashing shows here).

Below it: the bound -- what one unlimited prefix cache would compute for the
same prompts, which no routing over the replicas can beat -- and the p99 TTFT
floor under it (each request's own prefill with that cache and nothing queued,
plus one decode step: no row's p99 can be lower), each row against
kvern's cache_aware, warnings from the processes' logs, which SGLang row is the
better (``hit_rate_sglang`` comes from it), and as the very last line,
machine-readable: ``prefill_ratio_rr_over_cache_aware=.. hit_rate_cache_aware=..
hit_rate_sglang=.. p99_ttft_ratio_cache_aware_over_least_load=..
p99_ttft_ratio_cache_aware_over_sglang=..`` (against the SGLang row the hit rate is from).

``--pressure X`` sizes the fleet's KV capacity at 1/X of the trace's live
working set (every tenant's system prompt, plus the blocks of the sessions in
flight at the busiest moment of the schedule; see
``routing_trace.live_working_set_blocks``): at 0.5 the fleet could hold it
twice, at 1.5 no routing can keep all of it anywhere, which is where routing
matters. Without it, ``--cache-share`` sizes each
replica against the system prompts alone; the setup line prints the pressure
either way.

``--quick`` runs a scaled-down trace (12 tenants, 30 sessions) in under a minute
to check the setup; with so few requests, first-time misses weigh heavily, so
quote the full run's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from multiprocessing.process import BaseProcess
from pathlib import Path
from subprocess import Popen
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import httpx  # noqa: E402
from routing_load import MODEL, run_trace, warm_up  # noqa: E402
from routing_trace import (  # noqa: E402
    FleetSpec,
    Row,
    Trace,
    TraceSpec,
    TurnResult,
    conversations,
    headline,
    headline_figures,
    live_working_set_blocks,
    make_trace,
    percentile,
    prefill_bound,
    ratio,
    replica_delta,
    summarize,
    ttft_floor_ms,
    working_set_blocks,
)

from tests.replica_main import ChatTokenizer, ReplicaSpec, fork_replica  # noqa: E402

Process = Popen[bytes]
SGLANG_ROUTER_VERSION = "0.3.2"


@dataclass(frozen=True, slots=True)
class KvernSetup:
    """How one kvern row runs in front of its replicas."""

    policy: str
    instances: int = 1  # behind a round-robin client
    shared: bool = True  # with several instances: routing.shared_state on one redis-server
    events: bool = False  # presence from the replicas' own KV events (upstreams[].kv_events)


KVERN_SETUPS = {
    "kvern_round_robin": KvernSetup("round_robin"),
    "kvern_least_load": KvernSetup("least_load"),
    "kvern_cache_aware": KvernSetup("cache_aware"),
    "kvern_cache_aware_x3": KvernSetup("cache_aware", instances=3),
    "kvern_cache_aware_x3_unshared": KvernSetup("cache_aware", instances=3, shared=False),
    "kvern_cache_aware_events": KvernSetup("cache_aware", events=True),
}
KVERN_ROWS = ("kvern_round_robin", "kvern_least_load", "kvern_cache_aware")
SGLANG_ROWS = ("sglang_openai", "sglang_sglang")
CONTENDERS = KVERN_ROWS + SGLANG_ROWS
SCALED_ROWS = tuple(name for name in KVERN_SETUPS if name not in KVERN_ROWS)
SGLANG_NOTE = """\
sglang-router 0.3.2, --policy cache_aware. With --backend openai (sglang_openai) the
policy is not consulted: each request goes to the worker with the lowest load count,
which that backend never raises, so all traffic lands on one replica. Its default
backend (sglang_sglang) does route chat requests by their messages' text through the
cache-aware tree (balancing by load only past 64 requests of imbalance)."""


@dataclass(frozen=True, slots=True)
class RunSpec:
    trace: TraceSpec
    fleet: FleetSpec
    drain_s: float  # after the last arrival, how long unfinished sessions may go on
    request_timeout_s: float
    cache_share: float  # one replica's cache / the blocks of all system prompts
    routing: tuple[tuple[str, Any], ...] = ()  # routing.* settings for every kvern contender


@dataclass(slots=True)
class Harness:
    """What every contender's run needs; passed around instead of module state."""

    run: RunSpec
    tokenize: ChatTokenizer  # the replicas' tokenizer, loaded once and forked into them
    logs: Path
    http: httpx.Client  # one client for control requests (a new one costs ~0.1 s)
    # Replica URL -> where it publishes its KV events (vLLM's form; the events row's only).
    events_of: dict[str, str] = field(default_factory=dict)
    # Every port handed out this run: the OS may offer a just-released port
    # again, and two processes given one port make one of them die at start.
    ports: set[int] = field(default_factory=set)

    def port(self) -> int:
        """A free port on 127.0.0.1 that no other process of this run was given."""
        while (port := free_port()) in self.ports:
            pass
        self.ports.add(port)
        return port


# -- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ok(h: Harness, url: str) -> bool:
    try:
        return h.http.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(ready: Callable[[], bool], alive: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 90
    while not ready():
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


def launch(h: Harness, name: str, args: list[str], stack: contextlib.ExitStack) -> Process:
    """Start ``args`` in a process group of its own; ``stack`` stops the whole group.

    A group, not just the process: ``sglang-router launch`` is a Python launcher
    whose router runs as ``sglang::router``; signalling the group leaves nothing
    behind. Output goes to a log file, never a pipe that could fill.
    """
    with open(h.logs / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"},
        )
    stack.callback(stop_group, proc)
    return proc


def stop_group(proc: Process) -> None:
    """SIGTERM the process group, SIGKILL whatever is left of it after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# uvicorn's answer to the HTTP/2 probe SGLang's router sends each worker once: harmless.
LOG_NOISE = ("Invalid HTTP request received",)


def log_warnings(logs: Path, per_file: int = 3) -> list[str]:
    """Warning and error lines of every process's log (a replica's tokenizer check, say)."""
    found = []
    for path in sorted(logs.glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()
        bad = [
            ln
            for ln in lines
            if any(w in ln for w in ("WARNING", "ERROR", "Traceback"))
            and not any(n in ln for n in LOG_NOISE)
        ]
        found += [f"{path.stem}: {ln.strip()[:160]}" for ln in bad[:per_file]]
    return found


def log_tail(h: Harness, name: str) -> str:
    path = h.logs / f"{name}.log"
    return path.read_text(errors="replace")[-1500:] if path.exists() else ""


def start_fleet(
    h: Harness, stack: contextlib.ExitStack, events: bool = False
) -> list[tuple[BaseProcess, str]]:
    """Fork fresh replica processes (the tokenizer comes loaded); ``stack`` stops them.

    ``events``: each publishes its cache's changes as vLLM's KV events
    (only for the row that follows them: encoding costs every request).
    """
    fleet = h.run.fleet
    procs: list[tuple[BaseProcess, str]] = []
    for i in range(fleet.num_replicas):
        spec = ReplicaSpec(
            name=f"r{i}",
            port=h.port(),
            capacity_blocks=fleet.capacity_blocks,
            max_concurrency=fleet.max_concurrency,
            prefill_us_per_token=fleet.prefill_us_per_token,
            decode_ms_per_token=fleet.decode_ms_per_token,
            block_size=fleet.block_size,
            model=MODEL,
            kv_events_port=h.port() if events else 0,
        )
        proc = fork_replica(spec, h.tokenize, str(h.logs / f"{spec.name}-{spec.port}.log"))
        stack.callback(stop_replica, proc)
        url = f"http://127.0.0.1:{spec.port}"
        if events:
            h.events_of[url] = f"tcp://127.0.0.1:{spec.kv_events_port}"
        procs.append((proc, url))
    return procs


def stop_replica(proc: BaseProcess) -> None:
    proc.terminate()
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()


def kvern_config(
    policy: str, replicas: list[str], fleet: FleetSpec, answer_tokens: int
) -> dict[str, Any]:
    """What an operator of these replicas would write: their sizes, slots and timings.

    ``decode_load_tokens`` is what one request's decode costs a replica, in
    prompt tokens prefilled in the same time: these replicas decode one
    request per slot, ``answer_tokens x decode time``, where a real batched
    engine's decode costs far less (kvern's default, 64).
    """
    from tests.assets import tokenizer_fixture

    decode_load = answer_tokens * fleet.decode_ms_per_token * 1000 / fleet.prefill_us_per_token

    return {
        "proxy": {"host": "127.0.0.1"},
        "upstreams": [
            {
                "name": f"r{i}",
                "url": url + "/v1",
                "kv_capacity_tokens": fleet.capacity_blocks * fleet.block_size,
                "block_size": fleet.block_size,
                "max_concurrency": fleet.max_concurrency,
            }
            for i, url in enumerate(replicas)
        ],
        "routing": {"policy": policy, "decode_load_tokens": round(decode_load)},
        # The simulated replicas cache prompt blocks only, not generated tokens.
        "upstream": {"cache_model": {"cache_generated": False}},
        "tokenizers": {"models": {MODEL: {"source": str(tokenizer_fixture("qwen2").directory)}}},
        "analytics": {"enabled": False},
    }


def start_kvern(
    h: Harness, row: str, replicas: list[str], stack: contextlib.ExitStack
) -> tuple[list[str], list[Process]]:
    """kvern as users run it (``python -m kvern serve``), in front of ``replicas``.

    ``row`` names its :class:`KvernSetup`: several instances share state
    through one ``redis-server`` (``routing.shared_state``), started here,
    unless the row is the unshared one (what sharing buys).
    """
    import yaml

    setup = KVERN_SETUPS[row]
    shared: dict[str, Any] = {}
    if setup.instances > 1 and setup.shared:
        from tests.redis_server import RedisServer

        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        (h.logs / f"redis-{row}").mkdir(exist_ok=True)
        store = RedisServer(binary, h.logs / f"redis-{row}")
        store.start()
        stack.callback(store.kill)
        shared = {
            "shared_state": f"redis://127.0.0.1:{store.port}/0",
            "shared_state_prefix": f"bench-{row}",
            "shared_state_publish_ms": 50,
        }
    urls, procs = [], []
    for k in range(setup.instances):
        name = row + (f"_{k}" if setup.instances > 1 else "")
        config = h.logs / f"{name}.yaml"
        data = kvern_config(setup.policy, replicas, h.run.fleet, h.run.trace.max_tokens)
        data["routing"].update(dict(h.run.routing) | shared)
        if setup.events:  # presence from the replicas' own KV events, not modelled
            for entry in data["upstreams"]:
                entry["kv_events"] = h.events_of[entry["url"].removesuffix("/v1")]
        # Analytics on, as users run it; /analytics then shows the routing reasons.
        data["analytics"] = {"enabled": True, "db_path": str(h.logs / f"{name}.db")}
        config.write_text(yaml.safe_dump(data), "utf-8")
        port = h.port()
        args = [
            sys.executable, "-m", "kvern", "serve", "--config", str(config),
            "--port", str(port), "--log-level", "warning",
        ]  # fmt: skip
        urls.append(f"http://127.0.0.1:{port}")
        procs.append(launch(h, name, args, stack))
    return urls, procs


def kvern_ready(h: Harness, url: str) -> bool:
    """Up, with the model's tokenizer loaded and its parity check done.

    ``/health`` answers before the last two (they run in the background); a
    trace started earlier would be routed without prefix knowledge for its
    first seconds, and share the CPU with the tokenizer load.
    """
    try:
        health = h.http.get(url + "/health", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return False
    tokenizer = (health.get("tokenizers") or {}).get(MODEL)
    if tokenizer is None:  # a /health without these sections: up is all we can know
        return "status" in health
    parity_done = "parity" not in health or MODEL in (health["parity"] or {})
    return tokenizer.get("kind") != "loading" and parity_done


def sglang_router_bin() -> Path:
    """``sglang-router`` from its own venv, built once per machine and version.

    Why its own venv: it is a contender here, not a kvern dependency, and it
    brings its own pins (FastAPI, pydantic).
    """
    from tests.assets import cache_root

    venv = cache_root() / f"sglang-router-{SGLANG_ROUTER_VERSION}-venv"
    binary = venv / "bin" / "sglang-router"
    if (venv / ".complete").exists() and binary.exists():
        return binary
    print(f"installing sglang-router {SGLANG_ROUTER_VERSION} into {venv} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"sglang-router=={SGLANG_ROUTER_VERSION}"], check=True)
    (venv / ".complete").write_text("ok")
    return binary


def start_sglang_router(
    h: Harness, backend: str, replicas: list[str], stack: contextlib.ExitStack
) -> tuple[str, Process]:
    port = h.port()
    args = [
        str(sglang_router_bin()), "launch", "--host", "127.0.0.1", "--port", str(port),
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(h.port()),
        "--backend", backend, "--policy", "cache_aware", "--log-level", "warn",
        "--worker-urls", *replicas,
    ]  # fmt: skip
    return f"http://127.0.0.1:{port}", launch(h, f"sglang_{backend}", args, stack)


def start_sglang(
    h: Harness, backend: str, replicas: list[str], stack: contextlib.ExitStack
) -> tuple[list[str], list[Process]]:
    url, proc = start_sglang_router(h, backend, replicas, stack)
    return [url], [proc]


def sglang_ready(h: Harness, url: str, expected: int) -> bool:
    """Its ``/health`` answers before the workers are registered; wait for all of them."""
    try:
        workers = h.http.get(url + "/workers", timeout=2).json().get("workers", [])
    except (httpx.HTTPError, ValueError):
        return False
    return sum(1 for w in workers if w.get("is_healthy")) == expected


@dataclass(slots=True)
class Contender:
    """One router (or several kvern instances) in front of its own fresh replicas.

    ``stack`` stops them all.
    """

    name: str
    replicas: list[str]
    urls: list[str]
    procs: list[Process]
    stack: contextlib.ExitStack

    def ready(self, h: Harness) -> bool:
        if self.name.startswith("kvern"):
            return all(kvern_ready(h, url) for url in self.urls)
        return sglang_ready(h, self.urls[0], len(self.replicas))

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)


def start_all(h: Harness, names: list[str], stack: contextlib.ExitStack) -> list[Contender]:
    """Start every contender's replicas, then every router, then wait for all of them.

    Why all at once: start-up is mostly CPU (kvern loads its tokenizer), so
    overlapping the contenders' start-ups on two cores saves half of it. Idle,
    the others cost nothing measurable while one contender runs. The replicas
    must answer before their router starts (SGLang re-checks a missing worker
    only every 30 s).
    """
    fleets = []
    for name in names:
        fleet_stack = stack.enter_context(contextlib.ExitStack())
        events = name in KVERN_SETUPS and KVERN_SETUPS[name].events
        fleets.append((fleet_stack, start_fleet(h, fleet_stack, events)))
    for _, procs in fleets:
        for replica, url in procs:
            try:
                wait_until(partial(http_ok, h, url + "/health"), replica.is_alive, f"replica {url}")
            except RuntimeError as exc:  # its log goes with the temporary folder: show it now
                port = url.rpartition(":")[2]
                tail = "".join(log_tail(h, p.stem) for p in h.logs.glob(f"r*-{port}.log"))
                raise RuntimeError(f"{exc}; its output:\n{tail}") from None
    contenders = []
    for name, (fleet_stack, procs) in zip(names, fleets, strict=True):
        replicas = [url for _, url in procs]
        if name in KVERN_SETUPS:
            urls, procs = start_kvern(h, name, replicas, fleet_stack)
        else:
            urls, procs = start_sglang(h, name.removeprefix("sglang_"), replicas, fleet_stack)
        contenders.append(Contender(name, replicas, urls, procs, fleet_stack))
    return contenders


def wait_ready(h: Harness, c: Contender) -> None:
    try:
        wait_until(lambda: c.ready(h), c.alive, c.name)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; its output:\n{log_tail(h, c.name)}") from None
    for url in c.urls:
        asyncio.run(warm_up(url))


# -- one contender -------------------------------------------------------------------------


def measure(h: Harness, c: Contender, trace: Trace) -> Row:
    """The trace through one contender, then stop it: one row."""
    before = [h.http.get(r + "/metrics-json").json() for r in c.replicas]
    results, duration = asyncio.run(run_trace(c.urls, trace, h.run))
    after = [h.http.get(r + "/metrics-json").json() for r in c.replicas]
    write_requests(h.logs / f"{c.name}.requests.jsonl", trace, results)
    if c.name.startswith("kvern"):
        for k, url in enumerate(c.urls):
            print_routing(h, url, c.name + (f" #{k}" if len(c.urls) > 1 else ""))
    t = time.perf_counter()
    c.stack.close()
    print(f"  {c.name}: trace {duration:.1f} s, stop {time.perf_counter() - t:.1f} s", flush=True)
    deltas = [replica_delta(b, a) for b, a in zip(before, after, strict=True)]
    return summarize(c.name, trace, h.run.fleet, results, deltas, duration)


def write_requests(path: Path, trace: Trace, results: list[TurnResult]) -> None:
    """One JSON line per request as the client saw it, with its tenant and kvern's ids.

    For reading a tail: kvern's request id joins the line to that row of the
    contender's analytics database (``<name>.db`` beside it), where its route
    reason and expected time to first byte are.
    """
    tenant = {s.session_id: s.tenant for s in trace.sessions}
    with path.open("w", encoding="utf-8") as out:
        for r in results:
            out.write(json.dumps(asdict(r) | {"tenant": tenant.get(r.session_id)}) + "\n")


def print_routing(h: Harness, url: str, name: str) -> None:
    """kvern's own view: why it routed as it did, and how often a decision came too late."""
    try:
        params = {"window": "all", "wait_s": 50}
        routing = h.http.get(url + "/analytics", params=params, timeout=60).json()
        health = h.http.get(url + "/health", timeout=10).json()
    except (httpx.HTTPError, ValueError) as exc:
        print(f"  {name}: no analytics ({type(exc).__name__})", flush=True)
        return
    reasons = (routing.get("routing") or {}).get("reasons", {})
    timeouts = (health.get("routing") or {}).get("decision_timeouts")
    waits = (health.get("routing") or {}).get("decision_ms")
    print(
        f"  {name}: reasons {reasons}, decision timeouts {timeouts}, decision ms {waits}",
        flush=True,
    )
    for u in (routing.get("routing") or {}).get("by_upstream", []):
        model = u.get("ttft_model") or {}
        if model.get("requests"):
            print(
                f"    {u['upstream']}: TTFT expected {model['expected_ms_mean']} ms vs actual"
                f" {model['actual_ms_mean']} ms on average, mean abs error"
                f" {model['abs_error_ms_mean']} ms over {model['requests']} requests",
                flush=True,
            )
    for u in (health.get("routing") or {}).get("upstreams", []):
        for cache in u.get("cache", {}).values():
            print(
                f"    {u['name']}: held {cache['held_tokens']} of learned"
                f" {cache['learned_capacity_tokens']} (configured {cache['capacity_tokens']}),"
                f" confirmed misses {cache['confirmed_misses']}, unexpected hits"
                f" {cache['unexpected_hits']}, corrected {cache['corrected_tokens']} tokens",
                flush=True,
            )


def size_capacity(trace: Trace, share: float, tok: ChatTokenizer, block_size: int) -> int:
    """Blocks per replica so that one replica holds ``share`` of all tenants' system prompts.

    Counted with the replicas' own tokenizer, so the share is exact.
    """
    return max(1, round(share * prompt_blocks(trace, tok, block_size)))


def prompt_blocks(trace: Trace, tok: ChatTokenizer, block_size: int) -> int:
    """Full KV blocks of every tenant's system prompt, as its first turn renders it."""
    return sum(
        len(tok({"messages": [{"role": "system", "content": p}]})) // block_size
        for p in trace.system_prompts
    )


# -- report ----------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'contender':<19}{'prefill':>10}{'hit':>7}{'ttft p50':>9}{'p99':>7}{'req/s':>7}"
        f"{'ptok/s':>8}{'ok':>6}{'fail':>5}{'unsent':>7}{'util':>6}{'queue':>7}{'pf max/min':>11}"
        f"{'req max/min':>12}{'evicted':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.error:
            print(f"{r.name:<19} not run: {r.error.strip().splitlines()[0][:100]}")
            continue
        print(
            f"{r.name:<19}{r.prefill_tokens:>10,}{r.hit_rate:>7.1%}{r.ttft_p50_ms:>9.0f}"
            f"{r.ttft_p99_ms:>7.0f}{r.requests_per_s:>7.1f}{r.prompt_tokens_per_s:>8.0f}"
            f"{r.requests:>6}{r.failed:>5}{r.unsent:>7}{r.utilization:>6.2f}{r.queue_ms:>7.0f}"
            f"{r.prefill_spread:>11.2f}{r.requests_spread:>12.2f}{r.evicted_blocks:>9,}"
        )
    for r in rows:
        if r.errors:
            print(f"  {r.name} failures: " + ", ".join(f"{n} x {e}" for e, n in r.errors.items()))


def print_comparisons(rows: list[Row]) -> None:
    by_name = {r.name: r for r in rows if not r.error}
    ca = by_name.get("kvern_cache_aware")
    if ca is None:
        return
    print("\nagainst kvern_cache_aware:")
    for other in by_name.values():
        if other is not ca:
            print(
                f"  {other.name:<19} computes x{ratio(other.prefill_tokens, ca.prefill_tokens):.2f}"
                f" the prefill tokens, p99 TTFT x{ratio(other.ttft_p99_ms, ca.ttft_p99_ms):.2f},"
                f" hit rate {other.hit_rate:.1%} vs {ca.hit_rate:.1%}"
            )


def print_setup(
    run: RunSpec, trace: Trace, total_blocks: int, working_set: int, distinct: int
) -> None:
    spec, fleet = run.trace, run.fleet
    pressure = working_set / (fleet.capacity_blocks * fleet.num_replicas)
    print(
        f"trace (seed {spec.seed}): {trace.num_requests} requests in {len(trace.sessions)} "
        f"sessions of {spec.num_tenants} tenants (Zipf s={spec.zipf_s}), arrivals over "
        f"{trace.arrival_window_s:.1f} s at {spec.requests_per_s:g} req/s offered, "
        f"{spec.turns[0]}-{spec.turns[1]} turns, think {spec.think_s:g} s, "
        f"answers of {spec.max_tokens} tokens\n"
        f"replicas: {fleet.num_replicas} x {fleet.max_concurrency} slots, "
        f"{fleet.capacity_blocks} blocks of {fleet.block_size} tokens each "
        f"({fleet.capacity_blocks / total_blocks:.0%} of the {total_blocks} blocks of all system "
        f"prompts; pressure {pressure:.2f}: a live working set of {working_set} blocks -- every "
        f"system prompt and the sessions in flight at the busiest moment; {distinct} distinct "
        f"over the run -- over {fleet.capacity_blocks * fleet.num_replicas} in the fleet), "
        f"prefill {fleet.prefill_us_per_token:g} us/token, decode "
        f"{fleet.decode_ms_per_token:g} ms/token",
        flush=True,
    )


# -- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    trace, fleet = TraceSpec(), FleetSpec()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short trace, under a minute")
    parser.add_argument("--seed", type=int, default=trace.seed)
    parser.add_argument("--json", type=Path, help="write the setup and every row here")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated")
    parser.add_argument("--sessions", type=int, default=0, help="trace length override")
    parser.add_argument("--rate", type=float, default=trace.requests_per_s, help="req/s")
    parser.add_argument("--max-concurrency", type=int, default=fleet.max_concurrency)
    parser.add_argument("--prefill-us", type=float, default=fleet.prefill_us_per_token)
    parser.add_argument("--decode-ms", type=float, default=fleet.decode_ms_per_token)
    parser.add_argument("--cache-share", type=float, default=0.5)
    parser.add_argument(
        "--pressure",
        type=float,
        default=None,
        help="size the fleet's KV capacity at 1/X of the trace's live working set (every system "
        "prompt and the sessions in flight at the busiest moment); overrides --cache-share",
    )
    parser.add_argument(
        "--logs",
        type=Path,
        help="keep every process's log and each contender's <name>.requests.jsonl here",
    )
    parser.add_argument(
        "--routing",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a routing.* setting for every kvern contender (YAML value), e.g. "
        "spill_reuse_weight=2; repeatable",
    )
    args = parser.parse_args()
    unknown = set(args.contenders.split(",")) - set(CONTENDERS) - set(SCALED_ROWS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; known: {', '.join(CONTENDERS)}")
    return args


def run_spec(args: argparse.Namespace) -> RunSpec:
    """The calibration; ``bench/routing_trace.py`` says why these numbers.

    ``--quick`` is the same workload scaled down to run in under a minute: a
    quarter of the tenants (so caches still warm up within the short trace),
    shorter sessions and think times, a shorter drain.
    """
    trace = TraceSpec(seed=args.seed, requests_per_s=args.rate)
    if args.quick:
        trace = replace(trace, num_tenants=12, num_sessions=30, turns=(2, 5), think_s=0.25)
    if args.sessions:
        trace = replace(trace, num_sessions=args.sessions)
    fleet = FleetSpec(
        max_concurrency=args.max_concurrency,
        prefill_us_per_token=args.prefill_us,
        decode_ms_per_token=args.decode_ms,
    )
    return RunSpec(
        trace=trace,
        fleet=fleet,
        drain_s=4.0 if args.quick else 20.0,
        request_timeout_s=30.0 if args.quick else 60.0,
        cache_share=args.cache_share,
        routing=tuple(_setting(kv) for kv in args.routing),
    )


def _setting(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        sys.exit(f"--routing takes KEY=VALUE, not {text!r}")
    return key.strip(), yaml.safe_load(value)


def main() -> None:
    from tests.assets import tokenizer_fixture

    started = time.perf_counter()
    args = parse_args()
    # SIGTERM (a timeout, say) unwinds like Ctrl-C, so every process started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = args.contenders.split(",")
    run = run_spec(args)
    trace = make_trace(run.trace)
    tokenize = ChatTokenizer.from_directory(tokenizer_fixture("qwen2").directory)
    total_blocks = prompt_blocks(trace, tokenize, run.fleet.block_size)
    prompts = [tokenize({"messages": m}) for m in conversations(trace)]
    bound = prefill_bound(prompts, run.fleet.block_size)
    floor_p99 = percentile(ttft_floor_ms(trace, tokenize, run.fleet), 99)
    distinct = working_set_blocks(prompts, run.fleet.block_size)
    turn_s = run.trace.max_tokens * run.fleet.decode_ms_per_token / 1000 + 0.05
    working_set, _ = live_working_set_blocks(trace, tokenize, run.fleet.block_size, turn_s)
    if args.pressure is not None:
        if args.pressure <= 0:
            sys.exit("--pressure must be > 0")
        replicas = run.fleet.num_replicas
        capacity = max(1, round(working_set / (args.pressure * replicas)))
    else:
        capacity = size_capacity(trace, run.cache_share, tokenize, run.fleet.block_size)
    run = replace(run, fleet=replace(run.fleet, capacity_blocks=capacity))
    if set(names) & set(SGLANG_ROWS):
        sglang_router_bin()
    print_setup(run, trace, total_blocks, working_set, distinct)
    rows: list[Row] = []
    with (
        tempfile.TemporaryDirectory(prefix="kvern-routing-") as tmp,
        httpx.Client(timeout=10) as http,
        contextlib.ExitStack() as stack,
    ):
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        h = Harness(run, tokenize, logs, http)
        t = time.perf_counter()
        contenders = start_all(h, names, stack)
        # Every contender ready before the first is measured: one still
        # loading its tokenizer takes the CPU the measured one's brain needs
        # (seen: the first of four kvern rows routed all by load, 70 timeouts).
        failed: dict[str, str] = {}
        for c in contenders:
            try:
                wait_ready(h, c)
            except (RuntimeError, httpx.HTTPError, OSError) as exc:
                c.stack.close()
                failed[c.name] = str(exc)
        print(f"  (all contenders started in {time.perf_counter() - t:.1f} s)")
        for c in contenders:
            try:
                if c.name in failed:
                    raise RuntimeError(failed[c.name])
                rows.append(measure(h, c, trace))
            except (RuntimeError, httpx.HTTPError, OSError) as exc:
                c.stack.close()
                rows.append(Row(name=c.name, error=str(exc)))
                print(f"  {c.name}: not run", flush=True)
        warnings = log_warnings(logs)
    figures, sglang_row = headline_figures({r.name: r for r in rows}, SGLANG_ROWS)
    print()
    print_table(rows)
    print(
        f"bound: one unlimited prefix cache (no routing computes less) would compute "
        f"{bound[0]:,} prefill tokens of {bound[1]:,} (hit {1 - ratio(*bound):.1%})"
    )
    print(
        f"p99 TTFT floor: {floor_p99:.0f} ms (each request's prefill under that cache at the "
        "replicas' rate, plus one decode step, nothing queued: under any row's p99)"
    )
    print_comparisons(rows)
    if warnings:
        print("\nwarnings in the processes' logs:\n  " + "\n  ".join(warnings))
    print(f"\n{SGLANG_NOTE}\nhit_rate_sglang is from the best SGLang row: {sglang_row}")
    if args.json:
        payload = {
            "setup": asdict(run),
            "bound": {"prefill_tokens": bound[0], "prompt_tokens": bound[1]},
            "ttft_floor_p99_ms": floor_p99,
            "working_set_blocks": working_set,
            "distinct_blocks": distinct,
            "pressure": working_set / (run.fleet.capacity_blocks * run.fleet.num_replicas),
            "rows": [asdict(r) for r in rows],
            "summary": figures,
            "sglang_row": sglang_row,
        }
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print(f"total {time.perf_counter() - started:.0f} s")
    print(headline(figures))


if __name__ == "__main__":
    main()
