"""Time to plan: `remediate start` → a plan waiting for approval, through the real workflow and worker.

A platform-wide incident and a single user's dispute, on the same seeded platform at each size (the
platform grows by seeding more orgs: a ten times larger platform has more customers, not customers
ten times larger, so the disputing user owns as many rows at every size). Per size: the first run
after seeding and two more, each with the per-activity breakdown read from the run's history.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import UTC
from typing import Any

import nats
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle

from activities.postgres.platform_summary import refresh_platform_summary
from benchmarks.bulk_load import indexes_built_after
from benchmarks.report import emit
from benchmarks.workflows import Stack
from contracts import names
from contracts.models import Phase, RemediationRequest, RemediationResult, Scope, StatusView, Trigger
from contracts.watch import WatchConfig
from local_platform.events import publish_stored
from local_platform.provider_payments import seeder_for
from local_platform.seeder import SeedSpec, seed
from remediation_client import watch
from remediation_client.runs import abort
from workflows.search_attributes import SA_PHASE

# An incident's drift does not grow with the platform: the same 1,300 drifted rows at every size from
# 20,000 rows up (fewer on the tiny platforms CI runs this on).
DRIFT = {"unbilled_closed": 650, "orphan_open": 325, "missing_open": 162, "payment_drift": 163}
ROWS_PER_ORG = 20_000
ENDED_PHASES = {p.value for p in (Phase.COMPLETED, Phase.FAILED, Phase.HANDED_OFF)}
POLL_S = 0.05


async def bench_time_to_plan(stack: Stack, sizes: list[int], runs: int = 3) -> None:
    """For each size (ascending): seed up to it, settle, refresh the summary, then time both incidents."""
    seeded = 0
    user = ""
    for number, size in enumerate(sorted(sizes)):
        rows = size - seeded
        spec = SeedSpec(
            orgs=max(1, rows // ROWS_PER_ORG),
            allocations=rows,
            prefix=f"ttp{number}",
            seed=11 + number,
            inject=drift_for(rows) if number == 0 else {},
            publish_events_limit=0,
        )
        started = time.perf_counter()
        async with stack.db.acquire() as conn, seeder_for(stack.settings) as provider:
            async with indexes_built_after(conn):
                report = await seed(conn, spec, provider=provider)
            await conn.execute("VACUUM (ANALYZE)")
        seed_s = time.perf_counter() - started
        seeded = size
        if number == 0:
            user = await stack.db.fetchval(
                "SELECT requested_by_user_id FROM billing.allocations WHERE id = $1",
                report.injected["unbilled_closed"][0],
            )
        # What the worker's background refresh does every PLATFORM_SUMMARY_REFRESH_SECONDS.
        refresh_s = await _timed(refresh_platform_summary(stack.db))
        user_rows = await stack.db.fetchval(
            "SELECT count(*) FROM billing.usage_records WHERE requested_by_user_id = $1", user
        )
        emit(
            "time_to_plan_seed",
            usage_rows=size,
            orgs=await stack.db.fetchval("SELECT count(*) FROM billing.orgs"),
            seed_and_vacuum_s=round(seed_s, 1),
            platform_summary_refresh_s=round(refresh_s, 2),
            dispute_user_usage_rows=user_rows,
        )
        for incident in ("global", "dispute"):
            for n in range(runs):
                wall, handle, view = await _to_plan(stack, _request(incident, size, n, user))
                emit(
                    "time_to_plan",
                    usage_rows=size,
                    incident=incident,
                    run=("first after seeding" if n == 0 else f"warm {n}"),
                    start_to_plan_s=round(wall, 2),
                    plan_actions=view.plan.action_count if view.plan else 0,
                    activities_s=await activity_seconds(handle),
                )
                await abort(stack.client, handle.id)
                await _ended(handle)
        await _with_watch(stack, size, runs)


async def _with_watch(stack: Stack, size: int, runs: int, changed: int = 1_000) -> None:
    """The platform-wide incident again, planned from a drift watch: its full pass, ``changed``
    allocations announced since and one tick, then the runs (the watch removed afterwards, so the next
    size's runs reconcile in full)."""
    config = WatchConfig(watch_id="ttp", every_seconds=3600, settle_seconds=0, act_threshold=10**9)
    await watch.enable(stack.client, stack.settings, config, "bench", paused=True)
    try:
        started = time.perf_counter()
        await watch.run_now(stack.client, "ttp", full=True)
        full_s = time.perf_counter() - started
        nc = await nats.connect(stack.settings.resolved_nats_url())
        try:
            ids = await stack.db.fetch(
                "SELECT id FROM billing.allocations TABLESAMPLE SYSTEM (1) REPEATABLE (29) LIMIT $1", changed
            )
            for row in ids:
                await publish_stored(nc, "billing.allocation_changed", "bench", "", allocation_id=row["id"])
            await nc.flush()
        finally:
            await nc.close()
        tick = await watch.run_now(stack.client, "ttp")
        emit("time_to_plan_watch", usage_rows=size, watch_full_pass_s=round(full_s, 2),
             tick_keys_checked=tick.keys_checked)  # fmt: skip
        for n in range(runs):
            request = _request("global", size, n, "").model_copy(
                update={"correlation_id": f"ttp-watch-{size}-{n}"}
            )
            wall, handle, view = await _to_plan(stack, request)
            emit(
                "time_to_plan",
                usage_rows=size,
                incident="global, planned from the drift watch",
                run=f"run {n + 1}",
                start_to_plan_s=round(wall, 2),
                plan_actions=view.plan.action_count if view.plan else 0,
                findings_from=view.plan.findings_from if view.plan else "",
                activities_s=await activity_seconds(handle),
            )
            await abort(stack.client, handle.id)
            await _ended(handle)
    finally:
        await watch.disable(stack.client, "ttp")
        await stack.db.execute("DELETE FROM remediation.watch_state WHERE watch_id = 'ttp'")


def drift_for(rows: int) -> dict[str, int]:
    """DRIFT, scaled down below 20,000 rows so a tiny platform is not mostly drift."""
    scale = min(1.0, rows / 20_000)
    return {kind: max(1, int(n * scale)) for kind, n in DRIFT.items()}


def _request(incident: str, size: int, n: int, user: str) -> RemediationRequest:
    """A platform-wide worker-failure incident, or the user's dispute, as `remediate start` sends it."""
    if incident == "global":
        return RemediationRequest(
            correlation_id=f"ttp-global-{size}-{n}", requested_by="ic-bench", trigger=Trigger.WORKER_FAILURE
        )
    return RemediationRequest(
        correlation_id=f"ttp-dispute-{size}-{n}",
        requested_by="ic-bench",
        trigger=Trigger.CUSTOMER_DISPUTE,
        scope=Scope(user_id=user),
    )


async def _to_plan(
    stack: Stack, request: RemediationRequest
) -> tuple[float, WorkflowHandle[Any, RemediationResult], StatusView]:
    """Start the run as `remediate start` does; the seconds until its history records the plan awaiting
    approval. Waiting reads the phase from `describe` (the server's answer, no worker involved): queries
    every 50 ms loaded the very worker being measured and rounded the figure up to the poll."""
    started = time.time()
    handle: WorkflowHandle[Any, RemediationResult] = await stack.client.start_workflow(
        names.WORKFLOW,
        request,
        id=request.workflow_id(),
        task_queue=stack.settings.task_queue,
        result_type=RemediationResult,
    )
    while True:
        described = await handle.describe()
        phase = described.typed_search_attributes.get(SA_PHASE)
        if phase == Phase.AWAITING_APPROVAL.value:
            break
        if described.status is not WorkflowExecutionStatus.RUNNING or phase in ENDED_PHASES:
            raise RuntimeError(f"{request.correlation_id} ended before its plan awaited approval: {phase}")
        await asyncio.sleep(POLL_S)
    view: StatusView = await handle.query(names.QUERY_STATUS, result_type=StatusView)
    return (await _phase_recorded_at(handle, Phase.AWAITING_APPROVAL)) - started, handle, view


async def _phase_recorded_at(handle: WorkflowHandle[Any, Any], phase: Phase) -> float:
    """When the run's history first records ``phase`` (the search attribute's upsert), as a Unix time."""
    async for event in handle.fetch_history_events():
        if event.HasField("upsert_workflow_search_attributes_event_attributes"):
            fields = event.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
            value = fields.get(SA_PHASE.name)
            if value is not None and json.loads(value.data) == phase.value:
                return event.event_time.ToDatetime(tzinfo=UTC).timestamp()
    raise RuntimeError(f"{handle.id}: no {phase.value} in its history")


async def activity_seconds(handle: WorkflowHandle[Any, Any]) -> dict[str, float]:
    """Each activity's schedule-to-close seconds in the run so far, in the order they were scheduled."""
    scheduled: dict[int, tuple[str, Any]] = {}
    took: dict[str, float] = {}
    async for event in handle.fetch_history_events():
        if event.HasField("activity_task_scheduled_event_attributes"):
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            scheduled[event.event_id] = (name, event.event_time.ToDatetime())
        elif event.HasField("activity_task_completed_event_attributes"):
            name, at = scheduled[event.activity_task_completed_event_attributes.scheduled_event_id]
            seconds = (event.event_time.ToDatetime() - at).total_seconds()
            took[name] = round(took.get(name, 0.0) + seconds, 3)
    return took


async def _ended(handle: WorkflowHandle[Any, Any]) -> None:
    """Wait for the aborted run to lift its freeze and end (the next run must not see it)."""
    with contextlib.suppress(WorkflowFailureError):
        await handle.result()


async def _timed(job: Any) -> float:
    started = time.perf_counter()
    await job
    return time.perf_counter() - started
