"""`remediate alerts serve`: the webhook receiver and the NATS subscriber in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
import nats
import uvicorn
from nats.errors import Error as NatsError
from temporalio.client import Client

from alert_intake.intake import Intake
from alert_intake.mapping import load_mapping
from alert_intake.nats_events import start_subscriber
from alert_intake.receiver import receiver_app
from config import Settings
from worker.connection import connect_temporal
from worker.serving import stop_event

log = logging.getLogger("billing_remediation.alert_intake")


@contextlib.asynccontextmanager
async def running_intake(
    settings: Settings, *, client: Client | None = None, port: int | None = None
) -> AsyncIterator[Intake]:
    """Serve the receiver (and the subscriber unless ALERTS_NATS=off) until the context exits."""
    token = settings.resolved_alerts_token()
    if token is None:
        raise ValueError(
            "ALERTS_TOKEN is not set (nor ALERTS_TOKEN_FILE): the alert receiver never runs without bearer auth"
        )
    mapping = load_mapping(settings.alerts_mapping_file)
    client = client or await connect_temporal(settings)
    pool = await asyncpg.create_pool(settings.resolved_database_url(), min_size=1, max_size=8)
    intake = Intake(client, settings, mapping, pool)
    app = receiver_app(intake, token)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.alerts_host,
            port=port if port is not None else settings.alerts_port,
            log_level="warning",
            lifespan="off",
        )
    )
    stop = asyncio.Event()
    tasks = [asyncio.create_task(server.serve())]
    nc = None
    if settings.alerts_nats == "on":
        nc = await nats.connect(settings.resolved_nats_url())
        subscriber, task = start_subscriber(
            intake,
            nc,
            stream=settings.billing_stream,
            subject=settings.alerts_nats_subject,
            durable=settings.alerts_nats_durable,
            stop=stop,
        )
        app.state.loops = {subscriber.name: subscriber}
        tasks.append(task)
    try:
        while not server.started:
            for task in tasks:
                if task.done():
                    task.result()
                    raise RuntimeError(f"alert intake: could not serve on {settings.alerts_host}")
            await asyncio.sleep(0.05)
        yield intake
    finally:
        stop.set()
        server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        if nc is not None:
            with contextlib.suppress(OSError, NatsError):
                await nc.close()
        await pool.close()


async def serve_forever(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM."""
    done = stop_event()
    async with running_intake(settings):
        log.info(
            "alert intake on http://%s:%s/alertmanager (NATS %s: %s)",
            settings.alerts_host,
            settings.alerts_port,
            settings.alerts_nats,
            settings.alerts_nats_subject,
        )
        await done.wait()
