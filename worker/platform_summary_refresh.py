"""The worker's background refresh of the platform summary (what scoped runs read instead of a scan)."""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from activities.postgres.platform_summary import refresh_platform_summary

log = logging.getLogger("billing_remediation.worker")


async def refresh_platform_summary_every(pool: asyncpg.Pool, interval_s: int) -> None:
    """Measure the platform now and every ``interval_s`` seconds until cancelled; failures are logged, not fatal."""
    while True:
        started = time.perf_counter()
        try:
            if await refresh_platform_summary(pool):
                log.info("platform summary refreshed in %.1f s", time.perf_counter() - started)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("platform summary refresh failed (retried in %d s): %r", interval_s, exc)
        await asyncio.sleep(interval_s)
