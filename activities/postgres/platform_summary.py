"""The platform-wide drift and consistency summary: measured in the background, read with its age.

A scoped run (one user's dispute) must not pay for a scan of the whole platform to learn whether the
problem is wider; a platform-wide run's consistency check must not pay for two full-table joins before
the plan. Both read the newest summary instead, if it is recent enough, and say how old it is. The
worker refreshes it (``refresh_platform_summary``, every ``PLATFORM_SUMMARY_REFRESH_SECONDS``) and every
platform-wide reconciliation pass records the drift it just found.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import asyncpg

from activities.postgres.consistency_sql import consistency_counts, count_all, drift_by_org
from contracts.models import Scope

KEEP_ROWS = 1000  # older summaries are pruned on each write
REFRESH_LOCK = "remediation.platform_summaries:refresh"


@dataclass(frozen=True)
class PlatformSummary:
    """One measurement of the whole platform and its age when read."""

    drift_by_kind: dict[str, int]
    orgs_with_drift: int
    consistency: dict[str, int] | None
    age_s: int
    source: str
    measured_at: str = ""  # UTC, HH:MM:SS

    def age_words(self) -> str:
        """How old the figures are, for headlines (``age_words``)."""
        return age_words(self.age_s)


def age_words(seconds: int) -> str:
    """'42 s' / '3 min' / '2 h': an age for headlines and plans."""
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


async def record_platform_summary(
    pool: asyncpg.Pool,
    source: str,
    drift_by_kind: dict[str, int],
    orgs_with_drift: int,
    consistency: dict[str, int] | None,
    measure_ms: int,
) -> None:
    """Store one measurement (and prune the oldest beyond KEEP_ROWS)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """INSERT INTO remediation.platform_summaries
                   (source, drift_by_kind, orgs_with_drift, consistency, measure_ms)
               VALUES ($1, $2, $3, $4, $5)""",
            source,
            json.dumps(drift_by_kind),
            orgs_with_drift,
            None if consistency is None else json.dumps(consistency),
            measure_ms,
        )
        await conn.execute(
            f"""DELETE FROM remediation.platform_summaries WHERE id <= (
                    SELECT id FROM remediation.platform_summaries ORDER BY id DESC OFFSET {KEEP_ROWS} LIMIT 1)"""
        )


async def latest_platform_summary(
    pool: asyncpg.Pool, max_age_s: int, *, with_consistency: bool = False
) -> PlatformSummary | None:
    """The newest summary at most ``max_age_s`` old (one that measured consistency, if asked), else None."""
    row = await pool.fetchrow(
        f"""SELECT drift_by_kind, orgs_with_drift, consistency, source,
                   floor(extract(epoch FROM now() - measured_at))::int AS age_s,
                   to_char(measured_at AT TIME ZONE 'UTC', 'HH24:MI:SS') AS measured_at
            FROM remediation.platform_summaries
            WHERE measured_at >= now() - make_interval(secs => $1)
              {"AND consistency IS NOT NULL" if with_consistency else ""}
            ORDER BY measured_at DESC LIMIT 1""",
        float(max_age_s),
    )
    if row is None:
        return None
    return PlatformSummary(
        drift_by_kind=json.loads(row["drift_by_kind"]),
        orgs_with_drift=int(row["orgs_with_drift"]),
        consistency=None if row["consistency"] is None else json.loads(row["consistency"]),
        age_s=max(0, int(row["age_s"])),
        source=str(row["source"]),
        measured_at=str(row["measured_at"]),
    )


async def refresh_platform_summary(pool: asyncpg.Pool) -> bool:
    """Measure drift by org and every consistency count over the whole platform, and store it.

    One refresher at a time across workers (an advisory lock); False when another one holds it.
    """
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", REFRESH_LOCK):
            return False
        try:
            started = time.perf_counter()
            drift, orgs = await drift_by_org(pool, Scope())
            consistency = await count_all(pool, consistency_counts(Scope()))
            took = int((time.perf_counter() - started) * 1000)
            await record_platform_summary(pool, "refresh", drift, len(orgs), consistency, took)
            return True
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", REFRESH_LOCK)
