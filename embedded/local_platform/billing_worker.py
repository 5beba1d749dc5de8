"""The stand-in billing worker (a durable JetStream consumer) and its outbox relay.

Provisioning events become usage records and ledger debits; notifications leave through the outbox.
`billing.worker_control.mode` makes the worker crash (stop consuming), stall, or loop on poison messages
(fetch, fail, NAK, forever), as in the incidents.
Both loops run supervised: an error restarts them with backoff, and their health is served on /healthz.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import datetime
from typing import Any

import asyncpg
from nats.aio.client import Client as NATS

from local_platform import telemetry
from local_platform.db import usage_cost_minor
from local_platform.events import ensure_worker_consumer
from worker.supervised_loop import (
    LoopHealth,
    describe,
    pull,
    require_connected,
    sleep_or_stop,
    start_supervised,
)

SERVICE = "gpuaas-billing-worker"
log = logging.getLogger(__name__)


async def worker_mode(pool: asyncpg.Pool) -> str:
    """Current control mode: running, crashed, stalled or poisoned; a faulty current revision crashes whatever the mode."""
    return str(
        await pool.fetchval(
            """SELECT CASE WHEN d.faulty THEN 'crashed' ELSE c.mode END FROM billing.worker_control c
               JOIN billing.worker_deployments d ON d.revision = c.revision WHERE c.id = 1"""
        )
    )


def _ts(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


async def _debit_closed_unbilled(conn: asyncpg.Connection, alloc: asyncpg.Record, corr: str | None) -> None:
    """Debit the allocation's closed usage records that have no debit yet (the platform's own key)."""
    await conn.execute(
        """INSERT INTO billing.ledger_entries (org_id, requested_by_user_id, kind, amount_minor,
               usage_record_id, idempotency_key, actor, correlation_id)
           SELECT u.org_id, u.requested_by_user_id, 'usage_debit', -u.accrued_cost_minor, u.id,
                  'usage-debit:' || u.id, $2, $3
           FROM billing.usage_records u
           WHERE u.allocation_id = $1 AND u.end_time IS NOT NULL AND u.accrued_cost_minor > 0
             AND NOT EXISTS (SELECT 1 FROM billing.ledger_entries l
                             WHERE l.usage_record_id = u.id AND l.kind = 'usage_debit' AND l.reversed_by_entry_id IS NULL)
           ON CONFLICT DO NOTHING""",
        alloc["id"],
        SERVICE,
        corr,
    )


async def handle_event(conn: asyncpg.Connection, subject: str, event: dict[str, Any]) -> None:
    """Apply one provisioning event idempotently (safe to redeliver)."""
    if event.get("replayed"):
        return
    corr, trace = event.get("correlation_id"), event.get("trace_id")
    alloc_id = event["allocation_id"]
    async with conn.transaction():
        if subject == "provisioning.active":
            alloc = await conn.fetchrow("SELECT * FROM billing.allocations WHERE id = $1", alloc_id)
            if alloc is None:
                return
            await conn.execute(
                """INSERT INTO billing.usage_records (allocation_id, org_id, project_id, requested_by_user_id,
                       start_time, last_billed_at, app_instance_id, usage_source, control_plane_component,
                       operating_mode, control_plane_scope, runtime_backend, idempotency_key, created_by,
                       correlation_id)
                   VALUES ($1,$2,$3,$4,$5,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)
                   ON CONFLICT DO NOTHING""",
                alloc_id,
                alloc["org_id"],
                alloc["project_id"],
                alloc["requested_by_user_id"],
                alloc["activated_at"],
                alloc["app_instance_id"],
                alloc["usage_source"],
                alloc["control_plane_component"],
                alloc["operating_mode"],
                alloc["control_plane_scope"],
                alloc["runtime_backend"],
                f"usage-open:{alloc_id}",
                SERVICE,
                corr,
            )
        elif subject == "provisioning.releasing.completed":
            released_at = _ts(event["at"])
            alloc = await conn.fetchrow(
                """UPDATE billing.allocations SET status = 'released', released_at = $2,
                       releasing_at = coalesce(releasing_at, $2) WHERE id = $1 RETURNING *""",
                alloc_id,
                released_at,
            )
            usage = await conn.fetchrow(
                "SELECT * FROM billing.usage_records WHERE allocation_id = $1 AND end_time IS NULL FOR UPDATE",
                alloc_id,
            )
            if alloc is None:
                return
            if usage is None:
                # A redelivered release whose usage was closed but never debited: finish the billing.
                await _debit_closed_unbilled(conn, alloc, corr)
                return
            seconds = int((released_at - usage["start_time"]).total_seconds())
            cost = usage_cost_minor(seconds, alloc["hourly_rate_minor"])
            await conn.execute(
                """UPDATE billing.usage_records SET end_time = $2, last_billed_at = $2, accrued_cost_minor = $3
                   WHERE id = $1""",
                usage["id"],
                released_at,
                cost,
            )
            if cost > 0:
                await conn.execute(
                    """INSERT INTO billing.ledger_entries (org_id, requested_by_user_id, kind, amount_minor,
                           usage_record_id, idempotency_key, actor, correlation_id)
                       VALUES ($1, $2, 'usage_debit', $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING""",
                    alloc["org_id"],
                    alloc["requested_by_user_id"],
                    -cost,
                    usage["id"],
                    f"usage-debit:{usage['id']}",
                    SERVICE,
                    corr,
                )
            await conn.execute(
                "INSERT INTO billing.outbox (subject, payload) VALUES ('billing.usage_debited', $1)",
                json.dumps(
                    {
                        "allocation_id": alloc_id,
                        "amount_minor": cost,
                        "correlation_id": corr,
                        "trace_id": trace,
                    }
                ),
            )
        elif subject == "provisioning.release_failed":
            await conn.execute(
                "UPDATE billing.allocations SET status = 'release_failed' WHERE id = $1 AND status <> 'released'",
                alloc_id,
            )
        await telemetry.log(
            conn,
            SERVICE,
            "info",
            f"processed {subject}",
            correlation_id=corr,
            trace_id=trace,
            allocation_id=alloc_id,
        )


async def run_worker(
    pool: asyncpg.Pool,
    nc: NATS,
    stream: str,
    durable: str,
    stop: asyncio.Event,
    health: LoopHealth,
) -> None:
    """One life of the consumer loop: (re)create and bind the consumer, then fetch until ``stop``.

    Any error ends this life and the supervisor starts another one, which binds again: a consumer
    deleted and re-created underneath the loop is picked up instead of leaving the worker dead.
    """
    js = nc.jetstream()
    await ensure_worker_consumer(js, stream, durable)
    sub = await js.pull_subscribe_bind(durable, stream=stream)
    try:
        while not stop.is_set():
            mode = await _active_mode(pool, nc, stop, health)
            if mode is None:
                continue
            poisoned = mode == "poisoned"
            for msg in await pull(sub, nc, health):
                try:
                    if poisoned:
                        raise ValueError("cannot decode event: unexpected schema version")
                    event = json.loads(msg.data)
                    async with pool.acquire() as conn:
                        await handle_event(conn, msg.subject, event)
                    await msg.ack()
                except Exception as exc:  # one bad event must not stop the worker
                    log.warning("billing worker failed on %s: %s", msg.subject, exc)
                    await telemetry.log(pool, SERVICE, "error", f"failed {msg.subject}: {exc}")
                    await msg.nak(delay=1 if poisoned else 5)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def run_outbox_relay(pool: asyncpg.Pool, nc: NATS, stop: asyncio.Event, health: LoopHealth) -> None:
    """Publish unpublished outbox rows to NATS and mark them published."""
    js = nc.jetstream()
    while not stop.is_set():
        if await _active_mode(pool, nc, stop, health) is None:
            continue
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """SELECT id, subject, payload FROM billing.outbox WHERE published_at IS NULL
                   ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED"""
            )
            for row in rows:
                await js.publish(row["subject"], row["payload"].encode())
                await conn.execute(
                    "UPDATE billing.outbox SET published_at = now(), attempts = attempts + 1 WHERE id = $1",
                    row["id"],
                )
        health.progress()
        if not rows:
            await sleep_or_stop(stop, 0.5)


async def _active_mode(pool: asyncpg.Pool, nc: NATS, stop: asyncio.Event, health: LoopHealth) -> str | None:
    """The control mode while the loops run (running, poisoned); None, after a short wait, while it says
    crashed or stalled, as in the incidents."""
    require_connected(nc, "NATS")
    mode = await worker_mode(pool)
    if mode in ("running", "poisoned"):
        return mode
    health.progress()
    await sleep_or_stop(stop, 0.5)
    return None


LOOPS = ("billing_worker", "outbox_relay")


def start(
    pool: asyncpg.Pool, nc: NATS, stream: str, durable: str, stop: asyncio.Event
) -> tuple[dict[str, LoopHealth], list[asyncio.Task[None]]]:
    """Start the worker and the relay, each supervised; returns their health and tasks."""
    health = {name: LoopHealth(name) for name in LOOPS}

    async def report(loop: LoopHealth, exc: BaseException) -> None:
        # The platform's own log (served by the Loki endpoint) says why its worker stopped and restarts.
        await telemetry.log(
            pool,
            SERVICE,
            "error",
            f"{loop.name} failed: {describe(exc)}; restarting (restart {loop.restarts})",
        )

    tasks = [
        start_supervised(
            health["billing_worker"],
            lambda h: run_worker(pool, nc, stream, durable, stop, h),
            stop,
            on_failure=report,
        ),
        start_supervised(
            health["outbox_relay"], lambda h: run_outbox_relay(pool, nc, stop, h), stop, on_failure=report
        ),
    ]
    return health, tasks
