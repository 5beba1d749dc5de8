"""The drift watch's figures: a tick after N changed allocations against the full reconciliation of the
same database, and the time from injected drift to a remediation waiting for approval."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import asyncpg
import nats
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import ActivityEnvironment

import remediation_client as operations
from activities.postgres.watch import WatchDatabaseActivities
from activities.watch_events import WatchEventActivities
from benchmarks.report import emit
from benchmarks.workflows import Stack
from config import Settings
from contracts import names
from contracts.models import Phase, RemediationRequest, Scope, StatusView
from contracts.watch import CheckRequest, PlanTick, WatchConfig, WatchTickRequest
from devstack.processes import free_port
from devstack.stack import Nats
from local_platform.events import ensure_stream, publish_stored
from local_platform.seeder import SeedSpec, seed
from remediation_client import watch

STREAM, WORKER = "PLATFORM", "billing-worker"


async def _tick(
    env: ActivityEnvironment,
    db: WatchDatabaseActivities,
    events: WatchEventActivities,
    tick_id: str,
    config: WatchConfig,
) -> tuple[float, float, int]:
    """One tick through the activities: (seconds collecting the events, seconds checking, keys checked)."""
    tick = await env.run(db.plan_tick, PlanTick(request=WatchTickRequest(config=config), tick_id=tick_id))
    started = time.perf_counter()
    collected = await env.run(events.collect_changed_keys, tick)
    collect_s = time.perf_counter() - started
    request = CheckRequest(tick=tick, config=config, worker=collected.worker)
    started = time.perf_counter()
    result = await env.run(db.full_pass if tick.mode == "full" else db.check_changed_keys, request)
    return collect_s, time.perf_counter() - started, result.keys_checked


async def bench_watch_tick(pool: asyncpg.Pool, root: Path, changed: int, reconcile_s: float) -> None:
    """``changed`` allocations announced on NATS, then one tick; beside the full reconcile (``reconcile_s``)."""
    settings = Settings(REMEDIATION_STATE_DIR=root / "watch-nats", NATS_PORT=free_port())
    server = Nats(settings)
    await asyncio.to_thread(server.start)
    nc = await nats.connect(settings.resolved_nats_url())
    events = WatchEventActivities(settings.resolved_nats_url(), STREAM, WORKER, pool)
    try:
        await ensure_stream(nc.jetstream(), STREAM)
        db, env = WatchDatabaseActivities(pool), ActivityEnvironment()
        config = WatchConfig(watch_id="bench", settle_seconds=0)
        _, full_s, _ = await _tick(env, db, events, "bench-watch-0", config)  # the first tick: a full pass
        allocations = [r[0] for r in await pool.fetch("SELECT id FROM billing.allocations")]
        for alloc in random.Random(26).sample(allocations, min(changed, len(allocations))):
            await publish_stored(nc, "billing.allocation_changed", "bench", "", allocation_id=alloc)
        await nc.flush()
        collect_s, check_s, checked = await _tick(env, db, events, "bench-watch-1", config)
        tick_s = collect_s + check_s
        emit(
            "watch_tick",
            changed_allocations=checked,
            tick_s=round(tick_s, 3),
            collect_events_s=round(collect_s, 3),
            check_keys_s=round(check_s, 3),
            full_reconcile_s=round(reconcile_s, 3),
            watch_full_pass_s=round(full_s, 3),
            ratio_to_full_reconcile=round(tick_s / reconcile_s, 4) if reconcile_s else None,
            goal_ratio="< 0.05",
        )
    finally:
        await events.close()
        await nc.close()
        await asyncio.to_thread(server.stop)


async def bench_drift_to_approval(stack: Stack, interval: int) -> None:
    """A schedule every ``interval`` s; drift announced by one event; seconds until its remediation waits."""
    async with stack.db.acquire() as conn:
        await seed(conn, SeedSpec(orgs=3, allocations=60, prefix="dta", seed=27, publish_events_limit=0))
    config = WatchConfig(watch_id="bench", every_seconds=interval, settle_seconds=0)
    await watch.enable(stack.client, stack.settings, config, "bench")
    try:
        await watch.run_now(stack.client, "bench")  # the first, full pass, before the drift
        row = await stack.db.fetchrow(
            """UPDATE billing.allocations SET status = 'released', released_at = now() WHERE id = (
                   SELECT a.id FROM billing.allocations a JOIN billing.usage_records u ON u.allocation_id = a.id
                   AND u.end_time IS NULL WHERE a.status = 'active' AND a.id LIKE 'dta-%' ORDER BY a.id LIMIT 1)
               RETURNING id, org_id"""
        )
        nc = await nats.connect(stack.settings.resolved_nats_url())
        injected = time.perf_counter()
        await publish_stored(nc, "billing.allocation_changed", "bench", "", allocation_id=row["id"])
        await nc.flush()
        await nc.close()
        workflow_id = RemediationRequest(
            correlation_id="bench", scope=Scope(org_id=row["org_id"]), requested_by="bench"
        ).workflow_id()
        handle = stack.client.get_workflow_handle(workflow_id)
        while True:
            try:
                view = await handle.query(names.QUERY_STATUS, result_type=StatusView)
                if view.phase is Phase.AWAITING_APPROVAL:
                    break
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:  # not started yet: the next tick starts it
                    raise
            if time.perf_counter() - injected > interval * 3 + 120:
                raise RuntimeError(
                    f"no remediation waiting for approval {interval * 3 + 120} s after the drift"
                )
            await asyncio.sleep(0.25)
        emit(
            "drift_to_approval",
            schedule_every_s=interval,
            seconds=round(time.perf_counter() - injected, 1),
            note="drift announced by one event at a random point of the schedule's interval; until the "
            "remediation it started waits for approval",
        )
        await operations.abort(stack.client, workflow_id)
    finally:
        await watch.disable(stack.client, "bench")
