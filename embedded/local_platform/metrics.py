"""The stand-in's Prometheus metrics (GET /metrics): worker, queue, outbox relay, payments, prepaid orgs.

Computed from the platform's own state at each scrape, so every stand-in (one per test world) reports
only its own platform. The names are the ones alerting/rules/ expects of a production platform.
"""

from __future__ import annotations

import asyncpg
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.errors import NotFoundError
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from config.metrics_text import CONTENT_TYPE, render
from local_platform.billing_worker import SERVICE, worker_mode


async def _families(pool: asyncpg.Pool, nc: NATS | None, stream: str, consumer: str) -> list[Metric]:
    up = GaugeMetricFamily("billing_worker_up", "1 while the billing worker consumes billing events")
    up.add_metric([], 1.0 if await worker_mode(pool) == "running" else 0.0)
    failures = CounterMetricFamily(
        "billing_worker_failures", "Billing events the worker failed to apply (its 'failed <subject>' lines)"
    )
    # Only failed events: a crash report is BillingWorkerDown's, not a failure to apply an event.
    failures.add_metric(
        [],
        float(
            await pool.fetchval(
                """SELECT count(*) FROM platform_obs.logs
                   WHERE service = $1 AND level = 'error' AND line LIKE '{%'
                     AND (line::jsonb ->> 'msg') LIKE 'failed %'""",
                SERVICE,
            )
        ),
    )
    outbox = await pool.fetchrow(
        """SELECT count(*) AS backlog,
                  coalesce(extract(epoch FROM now() - min(created_at)), 0) AS oldest,
                  count(*) FILTER (WHERE failed_at IS NOT NULL) AS failed
           FROM billing.outbox WHERE published_at IS NULL"""
    )
    backlog = GaugeMetricFamily("billing_outbox_backlog", "Outbox rows not yet published")
    backlog.add_metric([], float(outbox["backlog"]))
    oldest = GaugeMetricFamily(
        "billing_outbox_oldest_unpublished_seconds", "Age of the oldest unpublished row"
    )
    oldest.add_metric([], float(outbox["oldest"]))
    failed = GaugeMetricFamily("billing_outbox_failed", "Unpublished outbox rows that failed to publish")
    failed.add_metric([], float(outbox["failed"]))
    reconcile = GaugeMetricFamily(
        "payments_reconcile_failed_sessions",
        "Payment sessions in failed_reconcile, per org",
        labels=["org_id"],
    )
    for row in await pool.fetch(
        """SELECT org_id, count(*) AS n FROM billing.payment_sessions WHERE status = 'failed_reconcile'
           GROUP BY org_id"""
    ):
        reconcile.add_metric([row["org_id"]], float(row["n"]))
    restricted = GaugeMetricFamily(
        "billing_org_launch_restricted",
        "1 while an org may not launch, with the restriction's reason",
        labels=["org_id", "reason"],
    )
    for row in await pool.fetch(
        """SELECT org_id, coalesce(reason, '') AS reason FROM billing.financial_restrictions
           WHERE state = 'restricted' AND block_new_launches"""
    ):
        restricted.add_metric([row["org_id"], row["reason"]], 1.0)
    families: list[Metric] = [up, failures, backlog, oldest, failed, reconcile, restricted]
    if nc is not None:
        families.extend(await _consumer(nc, stream, consumer))
    return families


async def _consumer(nc: NATS, stream: str, consumer: str) -> list[Metric]:
    """The worker's JetStream consumer: messages waiting (pending + unacknowledged) and its ack floor."""
    try:
        info = await nc.jetstream().consumer_info(stream, consumer)
    except (NotFoundError, NatsError, TimeoutError, OSError):
        return []  # no series: absent, not zero (a missing consumer is not "no lag")
    pending = GaugeMetricFamily(
        "billing_worker_consumer_pending_messages",
        "Billing events waiting for the worker (pending + unacknowledged)",
        labels=["consumer"],
    )
    pending.add_metric([consumer], float((info.num_pending or 0) + (info.num_ack_pending or 0)))
    floor = GaugeMetricFamily(
        "billing_worker_consumer_ack_floor_stream_seq",
        "Stream sequence the worker has acknowledged up to",
        labels=["consumer"],
    )
    floor.add_metric([consumer], float(info.ack_floor.stream_seq if info.ack_floor else 0))
    return [pending, floor]


async def metrics(request: Request) -> Response:
    """GET /metrics: the platform's health in the Prometheus text format (unauthenticated, as scrapes are)."""
    state = request.app.state
    families = await _families(
        state.pool, getattr(state, "nc", None), getattr(state, "stream", ""), getattr(state, "consumer", "")
    )
    return Response(render(families), media_type=CONTENT_TYPE)


ROUTES = [Route("/metrics", metrics)]
