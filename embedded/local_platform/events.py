"""The platform's JetStream stream and event envelope."""

from __future__ import annotations

import json
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig
from nats.js.errors import NotFoundError

STREAM_SUBJECTS = ["provisioning.>", "billing.>", "payments.>", "remediation.>"]
WORKER_FILTER = "provisioning.>"


async def ensure_stream(js: JetStreamContext, stream: str) -> None:
    """Create the platform stream if it does not exist."""
    try:
        await js.stream_info(stream)
    except NotFoundError:
        await js.add_stream(StreamConfig(name=stream, subjects=STREAM_SUBJECTS))


def worker_consumer_config(durable: str) -> ConsumerConfig:
    """The billing worker's durable pull consumer: every provisioning event, explicit acks."""
    return ConsumerConfig(
        durable_name=durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        filter_subject=WORKER_FILTER,
        max_ack_pending=1000,
        ack_wait=30,
    )


async def ensure_worker_consumer(js: JetStreamContext, stream: str, durable: str) -> None:
    """Create the billing worker's durable consumer if missing; never deletes one.

    Creating a consumer that exists with the same configuration is a no-op on the server, so two
    processes preparing the platform at once cannot race. (Deleting and re-creating it, as this once
    did, pulled the consumer from under a running worker.)
    """
    try:
        await js.consumer_info(stream, durable)
    except NotFoundError:
        await js.add_consumer(stream, worker_consumer_config(durable))


def envelope(correlation_id: str, trace_id: str, **data: Any) -> bytes:
    """Encode an event: every event carries correlation_id and trace_id."""
    return json.dumps({"correlation_id": correlation_id, "trace_id": trace_id, **data}, default=str).encode()


async def publish(nc: NATS, subject: str, correlation_id: str, trace_id: str, **data: Any) -> None:
    """Publish one event (core publish; the stream captures it)."""
    await nc.publish(
        subject,
        envelope(correlation_id, trace_id, **data),
        headers={"Nats-Correlation-Id": correlation_id, "Nats-Trace-Id": trace_id},
    )


async def publish_stored(nc: NATS, subject: str, correlation_id: str, trace_id: str, **data: Any) -> None:
    """Publish one event and wait until the stream has stored it (JetStream's publish acknowledgement)."""
    await nc.jetstream().publish(
        subject,
        envelope(correlation_id, trace_id, **data),
        headers={"Nats-Correlation-Id": correlation_id, "Nats-Trace-Id": trace_id},
    )
