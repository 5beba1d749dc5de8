"""JetStream subscriber for platform events that start remediations (``payments.reconcile_failed``)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from temporalio.service import RPCError

from alert_intake.intake import Intake
from alert_intake.mapping import AlertRefused

log = logging.getLogger("billing_remediation.alert_intake")


async def consume_events(
    intake: Intake, nc: NATS, *, stream: str, subject: str, durable: str, stop: asyncio.Event
) -> None:
    """Start or attach a remediation per event until ``stop``; a durable consumer resumes after restarts."""
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
    while not stop.is_set():
        try:
            msgs = await sub.fetch(50, timeout=1)
        except NatsTimeout:
            continue
        for msg in msgs:
            try:
                intended = await intake.from_event(msg.subject, msg.data)
            except AlertRefused as err:
                # Redelivering a malformed event can never succeed: drop it, loudly.
                log.error("refused event on %s: %s", msg.subject, err)
                await msg.term()
                continue
            try:
                await intake.deliver(intended)
            except (RPCError, OSError, asyncpg.PostgresError) as err:
                log.warning("could not deliver %s (will retry): %s", msg.subject, err)
                await msg.nak(delay=5)
                continue
            await msg.ack()
