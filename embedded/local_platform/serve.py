"""Run the stand-in: the HTTP APIs (billing admin, Loki, Tempo), the billing worker and the outbox relay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
import nats
import uvicorn
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from starlette.applications import Starlette

from config import Settings
from local_platform import admin_api, billing_worker, metrics, observability_api, otlp_receiver
from local_platform.db import migrate
from local_platform.events import ensure_stream, ensure_worker_consumer

log = logging.getLogger(__name__)


def build_app(pool: asyncpg.Pool, token: str, *, require_tenant: bool = False) -> Starlette:
    """The stand-in's ASGI app over an existing pool."""
    app = Starlette(
        routes=[*admin_api.ROUTES, *observability_api.ROUTES, *otlp_receiver.ROUTES, *metrics.ROUTES]
    )
    app.state.pool = pool
    app.state.token = token
    app.state.require_tenant = require_tenant
    return app


async def prepare(settings: Settings) -> None:
    """Apply the platform schema and create the stream and the worker's consumer."""
    conn = await asyncpg.connect(settings.resolved_database_url())
    try:
        await migrate(conn)
    finally:
        await conn.close()
    nc = await nats.connect(settings.resolved_nats_url())
    try:
        js = nc.jetstream()
        await ensure_stream(js, settings.billing_stream)
        await ensure_worker_consumer(js, settings.billing_stream, settings.billing_consumer)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def platform_connections(settings: Settings) -> AsyncIterator[tuple[asyncpg.Connection, NATS]]:
    """A prepared platform's database connection and NATS client, closed on exit (seeders, incidents)."""
    await prepare(settings)
    conn = await asyncpg.connect(settings.resolved_database_url())
    try:
        nc = await nats.connect(settings.resolved_nats_url())
        try:
            yield conn, nc
        finally:
            await nc.close()
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def running_platform(settings: Settings, port: int) -> AsyncIterator[None]:
    """Serve the stand-in on ``port`` with its worker and relay until the context exits."""
    await prepare(settings)
    pool = await asyncpg.create_pool(settings.resolved_database_url(), min_size=1, max_size=8)
    nc = await nats.connect(settings.resolved_nats_url())
    app = build_app(pool, settings.billing_api_token.get_secret_value())
    # For /metrics: the worker's consumer, read from JetStream at each scrape.
    app.state.nc, app.state.stream, app.state.consumer = (
        nc,
        settings.billing_stream,
        settings.billing_consumer,
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    stop = asyncio.Event()
    loops, loop_tasks = billing_worker.start(
        pool, nc, settings.billing_stream, settings.billing_consumer, stop
    )
    app.state.loops = loops
    tasks = [asyncio.create_task(server.serve()), *loop_tasks]
    try:
        while not server.started:
            if tasks[0].done():
                tasks[0].result()
                raise RuntimeError(f"platform: could not serve on 127.0.0.1:{port}")
            await asyncio.sleep(0.05)
        yield
    finally:
        stop.set()
        server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        # A connection NATS already dropped (server restarted) must not fail the shutdown.
        with contextlib.suppress(OSError, NatsError):
            await nc.close()
        await pool.close()


async def serve_forever(settings: Settings) -> None:
    """Entry point of `remediate platform serve`."""
    async with running_platform(settings, settings.platform_port):
        log.info("platform stand-in serving on %s", settings.resolved_billing_api_url())
        await asyncio.Event().wait()
