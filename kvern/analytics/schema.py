"""The analytics database schema, as an append-only list of migrations.

Why migrations rather than ``CREATE TABLE IF NOT EXISTS``: the file outlives
the process (30 days of rows by default), and later features add to it
(routing decisions, per-upstream cache figures). ``PRAGMA user_version`` in the
file's header counts the migrations applied, so a newer kvern adds what is
missing and an older one refuses a file it does not understand instead of
writing rows that no longer fit.

Rules for whoever adds migration N+1: append, never edit a released entry; one
script per step; it runs inside one transaction together with the bump of
``user_version``, so a failure leaves the file at version N.
"""

from __future__ import annotations

import sqlite3
from typing import Final

import aiosqlite

MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: one row per proxied request (see kvern.analytics.records.RequestRecord).
    # Booleans are INTEGER 0/1. The rowid orders rows by insertion; request_id
    # is not unique on purpose: a duplicate id must not fail a whole batch.
    """
    CREATE TABLE requests (
        request_id TEXT NOT NULL,
        ts_s REAL NOT NULL,
        model TEXT NOT NULL,
        tenant TEXT,
        endpoint TEXT NOT NULL,
        upstream TEXT NOT NULL,
        stream INTEGER NOT NULL,
        status INTEGER,
        error TEXT,
        prompt_tokens INTEGER,
        matched_tokens INTEGER,
        matched_tokens_aligned INTEGER,
        hit INTEGER,
        tokenizer_kind TEXT,
        ttfb_ms REAL,
        latency_ms REAL,
        completion_tokens INTEGER,
        upstream_prompt_tokens INTEGER,
        reported_cached_tokens INTEGER,
        reported_cached_source TEXT,
        finish_reason TEXT
    );
    CREATE INDEX requests_ts ON requests (ts_s);
    CREATE INDEX requests_model_ts ON requests (model, ts_s);
    CREATE INDEX requests_tenant_ts ON requests (tenant, ts_s);
    CREATE INDEX requests_upstream_ts ON requests (upstream, ts_s);
    """,
    # 2: kvern's model of the backend's own cache (see kvern.cache_models): the
    # cached tokens it predicts the backend will report, which cache model
    # made the prediction, and the KV block size it counted in.
    """
    ALTER TABLE requests ADD COLUMN predicted_cached_tokens INTEGER;
    ALTER TABLE requests ADD COLUMN backend_model TEXT;
    ALTER TABLE requests ADD COLUMN block_size INTEGER;
    """,
    # 3: tokenizer and template parity checks against the upstream (see
    # kvern.parity): one row per check; booleans INTEGER 0/1, NULL when not
    # compared; first_diff_json is the first difference found, as JSON.
    """
    CREATE TABLE parity_checks (
        ts_s REAL NOT NULL,
        model TEXT NOT NULL,
        upstream TEXT NOT NULL,
        method TEXT,
        status TEXT NOT NULL,
        template_match INTEGER,
        tokens_match INTEGER,
        first_diff_json TEXT,
        detail TEXT
    );
    CREATE INDEX parity_checks_model_upstream_ts ON parity_checks (model, upstream, ts_s);
    """,
    # 4: routing across several upstreams (see kvern.routing): the policy's
    # reason for the first choice, upstreams tried, and the chosen upstream's
    # load (prompt-token equivalents in flight) when it was chosen.
    """
    ALTER TABLE requests ADD COLUMN route_reason TEXT;
    ALTER TABLE requests ADD COLUMN route_attempts INTEGER;
    ALTER TABLE requests ADD COLUMN route_load_tokens INTEGER;
    """,
    # 5: the end user (a keyed hash of the body's ``user`` field), a second
    # breakdown beside the tenant, which is now the API key alone.
    """
    ALTER TABLE requests ADD COLUMN end_user TEXT;
    CREATE INDEX requests_end_user_ts ON requests (end_user, ts_s);
    """,
    # 6: why the prompt tokens not reused were not (kvern.diagnosis.reasons), and
    # where a diverged prompt parted from an earlier one (its site: the shared
    # prefix's hash and the place), with short text windows around it.
    """
    ALTER TABLE requests ADD COLUMN miss_reason TEXT;
    ALTER TABLE requests ADD COLUMN miss_tokens INTEGER;
    ALTER TABLE requests ADD COLUMN lost_reason TEXT;
    ALTER TABLE requests ADD COLUMN lost_tokens INTEGER;
    ALTER TABLE requests ADD COLUMN novel_tokens INTEGER;
    ALTER TABLE requests ADD COLUMN diverge_at INTEGER;
    ALTER TABLE requests ADD COLUMN diverge_place TEXT;
    ALTER TABLE requests ADD COLUMN diverge_prefix TEXT;
    ALTER TABLE requests ADD COLUMN diverge_before TEXT;
    ALTER TABLE requests ADD COLUMN diverge_ours TEXT;
    ALTER TABLE requests ADD COLUMN diverge_theirs TEXT;
    CREATE INDEX requests_diverge_site ON requests (model, diverge_prefix, diverge_place);
    """,
    # 7: moments that change how later rows read (see kvern.analytics.events):
    # kind "rules_changed" when config.yaml's normalization rules were reloaded;
    # detail is JSON (which models' rules changed, a short hash of the new rules).
    """
    CREATE TABLE events (
        ts_s REAL NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT
    );
    CREATE INDEX events_kind_ts ON events (kind, ts_s);
    """,
    # 8: the router's expected time to first byte at the upstream it chose
    # (cache_aware), to set beside ttfb_ms: the error of its latency model.
    """
    ALTER TABLE requests ADD COLUMN route_expected_ttft_ms REAL;
    """,
)

# The schema version this code writes: the number of migrations it knows.
SCHEMA_VERSION: Final[int] = len(MIGRATIONS)


class SchemaTooNewError(RuntimeError):
    """The database was written by a newer kvern whose schema this one lacks."""


async def user_version(conn: aiosqlite.Connection) -> int:
    """The number of migrations already applied to the connected database."""
    rows = list(await conn.execute_fetchall("PRAGMA user_version"))
    return int(rows[0][0])


async def migrate(conn: aiosqlite.Connection, migrations: tuple[str, ...] = MIGRATIONS) -> int:
    """Apply the migrations the database lacks, one transaction each; returns the version.

    ``migrations`` is a parameter so tests can exercise a later step without
    editing the real list. ``BEGIN IMMEDIATE`` takes the write lock before the
    script runs; if another process migrated the file meanwhile, the script
    fails (the table exists), and re-reading the version tells that case apart
    from a real error.
    """
    current = await user_version(conn)
    if current > len(migrations):
        raise SchemaTooNewError(
            f"analytics database has schema version {current}, but this kvern knows "
            f"only up to {len(migrations)}; upgrade kvern or point it at another file"
        )
    for version in range(current + 1, len(migrations) + 1):
        script = (
            f"BEGIN IMMEDIATE;\n{migrations[version - 1]}\n"
            f"PRAGMA user_version = {version};\nCOMMIT;"
        )
        try:
            await conn.executescript(script)
        except sqlite3.Error:
            await conn.rollback()
            if await user_version(conn) >= version:
                continue  # another process applied it first
            raise
    return await user_version(conn)
