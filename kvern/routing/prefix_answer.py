"""What the router is told of a prompt's prefix: plain numbers, sent from the brain's process.

Its own module because both sides read it: the brain builds it from a
:class:`kvern.routing.presence_match.PresenceMatch` (on the tracking thread, with
the trie), the router and the process link only carry and read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class InFlightPrefix:
    """Of a prefix held on an upstream, what is surely computed and when the rest was marked."""

    settled: int  # prompt tokens it surely holds (reusable: whole blocks)
    marked_s: float  # wall clock: the rest was first marked by requests routed by then
    # Prompt tokens (reusable) through the deepest node that may still be
    # computing: what the upstream holds once those requests have prefilled.
    reach: int


@dataclass(frozen=True, slots=True)
class PrefixAnswer:
    """What the router needs of a :class:`PresenceMatch`: plain numbers, sent between processes."""

    num_tokens: int  # the prompt's length
    cached: dict[str, int]  # upstream -> tokens it should report cached
    fill: dict[str, float]  # upstream -> share of its budget held
    # Requests a second through the longest held prefix (see PresenceMatch.requests_per_s).
    hot_per_s: float = 0.0
    assigned: dict[str, int] = field(default_factory=dict)  # see PresenceMatch.assigned
    # upstream -> the part of its ``cached`` a request may still be computing
    # (see ModelPresence.in_flight); absent: all of it is computed.
    in_flight: dict[str, InFlightPrefix] = field(default_factory=dict)
