"""`remediate approvals serve`: the approval page on loopback (APPROVALS_HOST / APPROVALS_PORT)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

import asyncpg
import uvicorn
from temporalio.client import Client

from approval_page.app import approvals_app
from config import Settings
from worker.connection import connect_temporal

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
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=settings.approvals_host,
                port=port if port is not None else settings.approvals_port,
                log_level="warning",
                lifespan="off",
            )
        )
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError(f"approval page: could not serve on {settings.approvals_host}")
            await asyncio.sleep(0.05)
        try:
            yield
        finally:
            server.should_exit = True
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await pool.close()


async def serve_forever(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    async with running_approvals(settings):
        log.info("approval page on %s", settings.approvals_url())
        await done.wait()
