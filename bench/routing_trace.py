"""The routing benchmark's workload and the arithmetic over its results; pure, no I/O.

The workload is a simulated replica fleet (:class:`FleetSpec`) and a multi-tenant
chat trace, deterministic given a seed:

- ``num_tenants`` tenants, each with its own system prompt of a few hundred to
  about 1,500 tokens, written from a fixed word list so every prompt is a
  different text (a few opening words are shared, as real preambles are);
- sessions arrive as a Poisson process; each picks its tenant by Zipf
  popularity (a few tenants get most sessions, a long tail gets a few), and
  has a few turns; each turn re-sends the whole conversation -- system prompt,
  earlier questions and the model's real earlier answers -- plus a new question,
  after a think time (exponential) once the previous answer has arrived.

Why this shape: it is where routing decides the prefix hit rate. Every session
re-reads its tenant's prefix and its own history; a router that sends a
session's turns (and its tenant's other sessions) to the replica already holding
them computes only the new tokens, one that spreads them recomputes everything.
With a per-replica cache smaller than all prefixes together, spreading also
makes every replica hold every tenant and evict them in turn.

Calibration (the defaults below), and why:

- timings: prefill 200 us per computed token, decode 20 ms per output token,
  16 output tokens, 4 running requests per replica. That is the issue's
  suggestion (20-50 us, 2-5 ms, about 8) slowed down about five times, with
  half the slots: the same ratio of prefill to decode work (a 1,000-token miss
  costs 200 ms, about ten decode steps), at a request rate two shared cores can
  carry through a Python proxy (kvern, four replicas and the load generator
  spend about 20 ms of CPU per request together);
- rate: 30 requests/s offered. least_load then keeps the replicas about 80%
  busy over the arrival window -- near capacity, requests queue in bursts --
  while 32/s already builds queues of seconds;
- cache: each replica holds half the blocks of all 48 system prompts
  (``cache_share`` in ``bench/routing.py``), so one replica cannot keep every
  tenant but the four together can, with room left for conversations;
- trace: system prompts of about 300-1,500 tokens, 2-8 turns, questions of
  10-40 words, 0.5 s mean think time; Zipf s=1 over 48 tenants gives the most
  popular tenant about 22% of the sessions, close to one replica's share.

The results side turns what the client saw (:class:`TurnResult`) and what the
replicas counted (``/metrics-json``) into one :class:`Row` per contender, and
the rows into the headline figures.

Kept apart from ``bench/routing.py`` (processes, HTTP, printing) so that
``tests/test_routing_trace.py`` can check it in milliseconds.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Common English words: system prompts and questions are drawn from these, so
# they tokenize like prose (about 1.2 tokens a word) yet differ per tenant.
WORDS = tuple(
    """
    account action address agent agree allow amount answer apply approve area ask
    balance bank basic bill board book branch brief budget build business buy call
    cancel card care case cash change charge check choose claim clear client close
    code company confirm contact contract control copy cost country cover create
    credit current customer data date deal debit decide default delay deliver detail
    device direct discount document due early email employee end enter error event
    exact expect explain express fee field file final find first fix follow form
    free full fund general give goal good group guide handle help high hold home
    hour identity include income inform issue item job keep key large late legal
    level limit line list local long loss low main manage market match member
    message method minimum model month move name need network new next note notice
    number offer office online open option order owner page paper part partner pay
    payment period person phone place plan point policy price print priority private
    process product profile project proof provide public quick range rate reason
    receipt record refund region regular remove renew report request require reset
    result return review right risk rule safe sale save schedule secure send service
    session share ship short sign simple single site size small source special staff
    standard start state status step stock store support system tax team term test
    time total track trade transfer travel trust type unit update usage user valid
    value verify view wait warranty week window work year zone
    """.split()
)
PREAMBLE = "You are the assistant of {company}, tenant {tenant}. Follow these rules exactly."


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """The simulated replicas, the same for every contender (see ``tests/replica_sim.py``)."""

    num_replicas: int = 4
    capacity_blocks: int = 0  # per replica; 0 until sized from the trace
    block_size: int = 16
    max_concurrency: int = 4  # running requests per replica; the rest queue
    prefill_us_per_token: float = 200.0  # per prompt token not in the prefix cache
    decode_ms_per_token: float = 20.0


@dataclass(frozen=True, slots=True)
class TraceSpec:
    """Everything the trace depends on; the same spec gives the same trace."""

    seed: int = 7
    num_tenants: int = 48
    system_words: tuple[int, int] = (240, 1200)  # uniform; about 300-1,500 tokens
    zipf_s: float = 1.0  # tenant popularity ~ 1 / rank**s
    num_sessions: int = 240
    turns: tuple[int, int] = (2, 8)  # uniform, per session
    question_words: tuple[int, int] = (10, 40)  # uniform, per user turn
    requests_per_s: float = 30.0  # mean offered rate; sessions arrive at rate / mean turns
    think_s: float = 0.5  # mean think time between an answer and the next question
    max_tokens: int = 16  # answer length asked for

    @property
    def mean_turns(self) -> float:
        return (self.turns[0] + self.turns[1]) / 2

    @property
    def sessions_per_s(self) -> float:
        return self.requests_per_s / self.mean_turns


@dataclass(frozen=True, slots=True)
class Session:
    """One conversation: whose, when it starts, what the user asks and when."""

    session_id: int
    tenant: int
    start_s: float  # offset from the start of the run
    questions: tuple[str, ...]  # one per turn
    think_s: tuple[float, ...]  # pause before each turn after the first


@dataclass(frozen=True, slots=True)
class Trace:
    spec: TraceSpec
    system_prompts: tuple[str, ...]  # one per tenant
    sessions: tuple[Session, ...] = field(repr=False)

    @property
    def num_requests(self) -> int:
        return sum(len(s.questions) for s in self.sessions)

    @property
    def arrival_window_s(self) -> float:
        """When the last session starts: the offered load lasts about this long."""
        return max((s.start_s for s in self.sessions), default=0.0)


def zipf_weights(n: int, s: float) -> list[float]:
    """Normalized popularity of ranks 1..n."""
    raw = [1.0 / (rank**s) for rank in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def sentences(rng: random.Random, num_words: int) -> str:
    """``num_words`` words as capitalized sentences of 6-18 words."""
    out: list[str] = []
    left = num_words
    while left > 0:
        n = min(left, rng.randint(6, 18))
        words = [rng.choice(WORDS) for _ in range(n)]
        out.append(" ".join(words).capitalize() + ".")
        left -= n
    return " ".join(out)


def system_prompt(rng: random.Random, tenant: int, num_words: int) -> str:
    company = " ".join(w.capitalize() for w in rng.sample(WORDS, 2)) + " Ltd"
    return PREAMBLE.format(company=company, tenant=tenant) + "\n\n" + sentences(rng, num_words)


def make_trace(spec: TraceSpec) -> Trace:
    """Build the trace; every draw comes from one RNG seeded with ``spec.seed``."""
    rng = random.Random(spec.seed)
    prompts = tuple(
        system_prompt(rng, t, rng.randint(*spec.system_words)) for t in range(spec.num_tenants)
    )
    weights = zipf_weights(spec.num_tenants, spec.zipf_s)
    # Tenant ranks are shuffled so popularity does not follow prompt length.
    rank_to_tenant = list(range(spec.num_tenants))
    rng.shuffle(rank_to_tenant)
    sessions: list[Session] = []
    t = 0.0
    for sid in range(spec.num_sessions):
        if sid:
            t += rng.expovariate(spec.sessions_per_s)
        tenant = rank_to_tenant[rng.choices(range(spec.num_tenants), weights=weights)[0]]
        turns = rng.randint(*spec.turns)
        questions = tuple(
            f"Question {sid}.{k}: " + sentences(rng, rng.randint(*spec.question_words))
            for k in range(turns)
        )
        think = tuple(rng.expovariate(1 / spec.think_s) for _ in range(turns - 1))
        sessions.append(Session(sid, tenant, t, questions, think))
    return Trace(spec, prompts, tuple(sessions))


def sim_answer(max_tokens: int) -> str:
    """The answer ``tests/replica_sim.py`` streams: ``"w{i} "`` for each decode step."""
    return "".join(f"w{i} " for i in range(max_tokens))


def conversations(trace: Trace) -> list[list[dict[str, str]]]:
    """Every request's messages, in about the order they are sent.

    Assumes the simulated replicas' answers (:func:`sim_answer`) and about one
    second per turn to order turns of different sessions.
    """
    timed = sorted(
        (session.start_s + turn, i, messages)
        for i, (session, turn, messages) in enumerate(_turns(trace))
    )
    return [messages for _, _, messages in timed]


def _turns(trace: Trace) -> list[tuple[Session, int, list[dict[str, str]]]]:
    """(session, turn, messages) of every request, session by session."""
    answer = sim_answer(trace.spec.max_tokens)
    out: list[tuple[Session, int, list[dict[str, str]]]] = []
    for session in trace.sessions:
        messages = [{"role": "system", "content": trace.system_prompts[session.tenant]}]
        for turn, question in enumerate(session.questions):
            messages = [*messages, {"role": "user", "content": question}]
            out.append((session, turn, messages))
            messages = [*messages, {"role": "assistant", "content": answer}]
    return out


def block_chain(ids: Sequence[int], block_size: int) -> list[int]:
    """The chained hashes of a prompt's full blocks (equal hashes: equal prefixes)."""
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(ids[start : start + block_size])))
        hashes.append(parent)
    return hashes


def working_set_blocks(prompts: Iterable[Sequence[int]], block_size: int) -> int:
    """Distinct full blocks over every prompt: what one cache must hold to reuse all of it.

    ``--pressure X`` sizes the fleet's KV capacity at 1/X of this (every
    tenant's system prompt and every session's turns), so at X > 1 no
    routing can keep all of it anywhere.
    """
    seen: set[int] = set()
    for ids in prompts:
        seen.update(block_chain(ids, block_size))
    return len(seen)


def live_working_set_blocks(
    trace: Trace,
    tokenize: Callable[[dict[str, Any]], Sequence[int]],
    block_size: int,
    turn_s: float,
) -> tuple[int, int]:
    """(blocks, of which system prompts): what the fleet must hold at once to reuse everything.

    Every tenant's system prompt (each is reused through the whole run) plus
    the own blocks (past the system prompt) of every session in flight at the
    busiest moment of the schedule -- turns sent ``turn_s`` apart plus the
    think times, as an unloaded replica would answer. ``--pressure X`` sizes
    the fleet at 1/X of it: at 1.0 a perfect partition of the fleet just holds
    it, at 1.5 nothing can. (Counting every block of every finished session
    instead would call an unpressed fleet pressed: sessions end, and their
    blocks are then free to evict.)
    """
    answer = sim_answer(trace.spec.max_tokens)
    system = {
        t: len(block_chain(tokenize({"messages": [{"role": "system", "content": p}]}), block_size))
        for t, p in enumerate(trace.system_prompts)
    }
    events: list[tuple[float, int]] = []
    for session in trace.sessions:
        messages = [{"role": "system", "content": trace.system_prompts[session.tenant]}]
        for question in session.questions:
            messages += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        blocks = len(block_chain(tokenize({"messages": messages}), block_size))
        own = max(0, blocks - system[session.tenant])
        end = session.start_s + sum(session.think_s) + len(session.questions) * turn_s
        events += [(session.start_s, own), (end, -own)]
    live = peak = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        live += delta
        peak = max(peak, live)
    prompts = sum(system.values())
    return prompts + peak, prompts


def prefill_bound(prompts: Iterable[Sequence[int]], block_size: int) -> tuple[int, int]:
    """(prefill tokens, prompt tokens) with one unlimited prefix cache.

    No routing over replicas can compute fewer: each replica's cache holds at
    most what this one does.
    """
    seen: set[int] = set()
    computed = total = 0
    for ids in prompts:
        computed += _computed_once(ids, block_size, seen)
        total += len(ids)
    return computed, total


def _computed_once(ids: Sequence[int], block_size: int, seen: set[int]) -> int:
    """Tokens of ``ids`` one unlimited cache holding ``seen`` computes; then it holds them too.

    Counted like the replicas count: whole blocks, chained hashes, the last
    prompt token always computed.
    """
    hashes = block_chain(ids, block_size)
    usable = min(len(hashes), (len(ids) - 1) // block_size)
    hit = 0
    while hit < usable and hashes[hit] in seen:
        hit += 1
    seen.update(hashes)
    return len(ids) - hit * block_size


def ttft_floor_ms(
    trace: Trace,
    tokenize: Callable[[dict[str, Any]], list[int]],
    fleet: FleetSpec,
) -> list[float]:
    """Each request's time to first token with nothing ahead of it: no routing beats it.

    The bound's one unlimited prefix cache, taken in the order sessions
    start: a request computes the tokens no earlier prompt held, at the
    replicas' prefill rate, then one decode step brings its first token.
    Sessions share only their tenant's system prompt, so the tenant's first
    session computes it; a later one sent while that one still computes is
    counted as hitting, which no real schedule does -- a floor. Any router's
    k-th slowest request is at least the k-th largest of these, so their
    p99 is a floor under every row's p99.
    """
    return [
        computed * fleet.prefill_us_per_token / 1000 + fleet.decode_ms_per_token
        for computed in bound_per_request(trace, tokenize, fleet.block_size).values()
    ]


def bound_per_request(
    trace: Trace, tokenize: Callable[[dict[str, Any]], list[int]], block_size: int
) -> dict[tuple[int, int], int]:
    """(session id, turn) -> the tokens the bound's one unlimited cache computes for it.

    In the order sessions start, as :func:`ttft_floor_ms` takes them: what a
    row computed over this for a request is what its routing cost
    (``bench/routing_excess.py``).
    """
    in_start_order = sorted(_turns(trace), key=lambda t: (t[0].start_s, t[1]))
    seen: set[int] = set()
    return {
        (session.session_id, turn): _computed_once(tokenize({"messages": m}), block_size, seen)
        for session, turn, m in in_start_order
    }


# -- arithmetic over results ---------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN when the denominator is 0 or either is NaN."""
    if denominator == 0 or math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    return numerator / denominator


def spread(values: Sequence[float]) -> float:
    """max / min of per-replica figures (1.0 = perfectly even; inf when one got none)."""
    if not values:
        return math.nan
    low, high = min(values), max(values)
    if low == 0:
        return math.inf if high > 0 else 1.0
    return high / low


def replica_delta(before: Mapping[str, object], after: Mapping[str, object]) -> dict[str, float]:
    """Counter increase between two ``/metrics-json`` snapshots (numeric fields only)."""
    out: dict[str, float] = {}
    for key, value in after.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            old = before.get(key, 0)
            out[key] = value - (old if isinstance(old, int | float) else 0)
    return out


@dataclass(slots=True)
class TurnResult:
    """One request as the client saw it."""

    session_id: int
    turn: int
    ok: bool
    sent_s: float  # since the start of the run
    done_s: float
    ttft_s: float | None = None  # to the first non-empty content
    prompt_tokens: int = 0  # from the usage chunk
    cached_tokens: int = 0
    error: str = ""
    upstream: str = ""  # where kvern sent it (its x-kvern-upstream header; "" elsewhere)
    request_id: str = ""  # kvern's x-kvern-request-id: its analytics row


@dataclass(slots=True)
class Row:
    """One contender's figures (``bench/routing.py``'s docstring explains the columns)."""

    name: str
    error: str = ""  # why the contender could not be run
    requests: int = 0  # completed
    failed: int = 0
    unsent: int = 0
    prompt_tokens: int = 0  # from here on, as the replicas counted
    cached_tokens: int = 0
    prefill_tokens: int = 0
    hit_rate: float = math.nan
    ttft_p50_ms: float = math.nan
    ttft_p99_ms: float = math.nan
    requests_per_s: float = math.nan
    prompt_tokens_per_s: float = math.nan
    utilization: float = math.nan
    queue_ms: float = math.nan  # mean wait for a running slot at the replica
    evicted_blocks: int = 0
    per_replica_prefill: list[int] = field(default_factory=list)
    per_replica_requests: list[int] = field(default_factory=list)
    prefill_spread: float = math.nan
    requests_spread: float = math.nan
    client_cached_tokens: int = 0  # cached tokens as the usage chunks told the client
    duration_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # failed requests by error


def summarize(
    name: str,
    trace: Trace,
    fleet: FleetSpec,
    results: Sequence[TurnResult],
    deltas: Sequence[Mapping[str, float]],
    duration_s: float,
) -> Row:
    """What the client saw plus what each replica counted -> one row.

    ``utilization`` is the simulated busy time (prefill of computed tokens plus
    decode steps) over the slot time available: near 1 the replicas were full.
    """
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    prompt = int(sum(d["prompt_tokens"] for d in deltas))
    cached = int(sum(d["cached_tokens"] for d in deltas))
    prefill = [int(d["prefill_tokens_computed"]) for d in deltas]
    served = [int(d["requests"]) for d in deltas]
    busy_s = sum(
        d["prefill_tokens_computed"] * fleet.prefill_us_per_token / 1e6
        + d["completion_tokens"] * fleet.decode_ms_per_token / 1e3
        for d in deltas
    )
    return Row(
        name=name,
        requests=len(ok),
        failed=len(results) - len(ok),
        unsent=trace.num_requests - len(results),
        prompt_tokens=prompt,
        cached_tokens=cached,
        prefill_tokens=sum(prefill),
        hit_rate=ratio(cached, prompt),
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p99_ms=percentile(ttfts, 99),
        requests_per_s=ratio(len(ok), duration_s),
        prompt_tokens_per_s=ratio(prompt, duration_s),
        utilization=ratio(busy_s, fleet.num_replicas * fleet.max_concurrency * duration_s),
        queue_ms=ratio(1000 * sum(d["queue_wait_s"] for d in deltas), sum(served)),
        evicted_blocks=int(sum(d["evicted_blocks"] for d in deltas)),
        per_replica_prefill=prefill,
        per_replica_requests=served,
        prefill_spread=spread(prefill),
        requests_spread=spread(served),
        client_cached_tokens=sum(r.cached_tokens for r in ok),
        duration_s=duration_s,
        errors=dict(Counter(r.error for r in results if not r.ok)),
    )


def headline_figures(
    rows: Mapping[str, Row], sglang_rows: Sequence[str]
) -> tuple[dict[str, float], str]:
    """The five figures of the last line, and which SGLang row ``hit_rate_sglang`` is from.

    A missing or failed row makes its figures NaN; the best SGLang row is the one
    with the highest hit rate.
    """

    def get(name: str) -> Row | None:
        row = rows.get(name)
        return None if row is None or row.error else row

    def prefill(row: Row | None) -> float:
        return math.nan if row is None else float(row.prefill_tokens)

    def field_of(row: Row | None, attr: str) -> float:
        return math.nan if row is None else float(getattr(row, attr))

    rr, ll, ca = get("kvern_round_robin"), get("kvern_least_load"), get("kvern_cache_aware")
    ran = [r for r in (get(n) for n in sglang_rows) if r is not None and not math.isnan(r.hit_rate)]
    best = max(ran, key=lambda r: r.hit_rate) if ran else None
    figures = {
        "prefill_ratio_rr_over_cache_aware": ratio(prefill(rr), prefill(ca)),
        "hit_rate_cache_aware": field_of(ca, "hit_rate"),
        "hit_rate_sglang": field_of(best, "hit_rate"),
        "p99_ttft_ratio_cache_aware_over_least_load": ratio(
            field_of(ca, "ttft_p99_ms"), field_of(ll, "ttft_p99_ms")
        ),
        # Against the same (best) SGLang row the hit rate is from: the anchor.
        "p99_ttft_ratio_cache_aware_over_sglang": ratio(
            field_of(ca, "ttft_p99_ms"), field_of(best, "ttft_p99_ms")
        ),
    }
    return figures, best.name if best else "none"


def headline(figures: Mapping[str, float]) -> str:
    """The machine-readable last line: ``key=value`` pairs, hit rates to 4 places."""
    return " ".join(
        f"{key}={value:.4f}" if key.startswith("hit") else f"{key}={value:.3f}"
        for key, value in figures.items()
    )
