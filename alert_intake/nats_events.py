"""JetStream subscriber for platform events that start remediations (``payments.reconcile_failed``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from temporalio.service import RPCError

from alert_intake.intake import Intake
from alert_intake.mapping import AlertRefused
from worker.supervised_loop import LoopHealth, pull, start_supervised

log = logging.getLogger("billing_remediation.alert_intake")


async def consume_events(
    intake: Intake,
    nc: NATS,
    *,
    stream: str,
    subject: str,
    durable: str,
    stop: asyncio.Event,
    health: LoopHealth,
) -> None:
    """One life of the subscriber: bind the durable consumer and start or attach a remediation per event.

    Runs under ``supervise``: an error ends this life, the next one binds again; the durable consumer
    resumes where the last acknowledged event left off.
    """
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        subject,
        durable=durable,
        stream=stream,
        # A first deployment does not replay old failures; later restarts resume where they stopped.
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.EXPLICIT, ack_wait=60, max_deliver=50
        ),
    )
    try:
        while not stop.is_set():
            for msg in await pull(sub, nc, health):
                await _handle(intake, msg)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def _handle(intake: Intake, msg: Msg) -> None:
    try:
        intended = await intake.from_event(msg.subject, msg.data)
    except AlertRefused as err:
        # Redelivering a malformed event can never succeed: drop it, loudly.
        log.error("refused event on %s: %s", msg.subject, err)
        await msg.term()
        return
    try:
        await intake.deliver(intended)
    except (RPCError, OSError, asyncpg.PostgresError) as err:
        log.warning("could not deliver %s (will retry): %s", msg.subject, err)
        await msg.nak(delay=5)
        return
    await msg.ack()


def start_subscriber(
    intake: Intake, nc: NATS, *, stream: str, subject: str, durable: str, stop: asyncio.Event
) -> tuple[LoopHealth, asyncio.Task[None]]:
    """The subscriber as a supervised task, with its health."""
    health = LoopHealth("nats_subscriber")
    task = start_supervised(
        health,
        lambda h: consume_events(
            intake, nc, stream=stream, subject=subject, durable=durable, stop=stop, health=h
        ),
        stop,
    )
    return health, task
