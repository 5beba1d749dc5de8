"""`remediate approvals serve`: the approval page on loopback (APPROVALS_HOST / APPROVALS_PORT)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
from temporalio.client import Client

from approval_page.app import approvals_app
from config import Settings
from worker.connection import connect_temporal
from worker.serving import serving, stop_event

log = logging.getLogger("billing_remediation.approval_page")


@contextlib.asynccontextmanager
async def running_approvals(
    settings: Settings, *, client: Client | None = None, port: int | None = None
) -> AsyncIterator[None]:
    """Serve the page until the context exits (refuses to start without authentication configured)."""
    client = client or await connect_temporal(settings)
    pool = await asyncpg.create_pool(settings.resolved_database_url(), min_size=1, max_size=4)
    try:
        app = approvals_app(settings, client, pool)
        port = port if port is not None else settings.approvals_port
        async with serving(app, "approval page", host=settings.approvals_host, port=port):
            yield
    finally:
        await pool.close()


async def serve_forever(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM."""
    done = stop_event()
    async with running_approvals(settings):
        log.info("approval page on %s", settings.approvals_url())
        await done.wait()
