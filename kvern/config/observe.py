"""The configuration of what kvern shows: ``/metrics`` series and the miss diagnosis.

Why apart from :mod:`kvern.config.schema`: these sections shape what kvern
reports, not how requests flow, and keeping them here holds the schema
module to one screenful per concept.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiagnosisConfig(_Section):
    """Why prompts missed: divergence sites and the text kept to show them.

    The text windows around each divergence are stored in the analytics rows
    (they are prompt text: ``window_chars: 0`` keeps none), and the brain
    keeps a few recent prompts per site in memory to measure what a
    suggested rule would have saved.
    """

    enabled: bool = True
    # Characters of text kept on each side of a divergence (0: none, redacted).
    window_chars: int = Field(48, ge=0, le=1000)
    # Recent prompts kept per divergence site, to replay a suggested rule over.
    samples_per_site: int = Field(16, ge=0, le=1000)
    # Divergence sites kept in memory (least recently seen dropped first).
    max_sites: int = Field(32, ge=1, le=10_000)
    # Characters of one sampled prompt kept (longer prompts are cut).
    max_sample_chars: int = Field(16_384, ge=1)


class MetricsConfig(_Section):
    """``GET /metrics``: Prometheus series, their label bounds, and per-tenant opt-in.

    Label values that come from clients (model names, tenants) are capped so
    a client inventing names cannot grow the series without bound: past the
    cap a new value is counted under ``__other__``.
    """

    enabled: bool = True
    # Distinct model names given series of their own.
    max_models: int = Field(32, ge=1)
    # Per-tenant series (keyed tenant ids, never the API key): off by default.
    tenant_series: bool = False
    # Distinct tenants given series of their own when tenant_series is on.
    max_tenants: int = Field(20, ge=1)
