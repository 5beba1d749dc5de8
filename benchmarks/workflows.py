"""Benchmarks through the real workflow: concurrent incidents on one worker, and flat history/memory.

Runs the whole embedded stack on free ports: Postgres, NATS, the Temporal dev server, the platform
stand-in and one in-process worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import SecretStr
from temporalio.api.common.v1 import Payload
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import ActivityEnvironment

from approval_page.app import approvals_app
from benchmarks.report import emit
from config import Settings
from config.approver_keys import load_private_key, sign
from contracts import names
from contracts.models import (
    ApprovalDecision,
    BlastRadiusRequest,
    EvidenceRequest,
    Phase,
    PlanRequest,
    ReconcileRequest,
    RegisterRun,
    RemediationRequest,
    RemediationResult,
    RunRef,
    Scope,
    SnapshotRequest,
    StatusView,
    Trigger,
)
from devstack.alerting import Alertmanager
from devstack.processes import free_port, spawn, stop_pid, wait_for_port
from devstack.stack import Nats, PaymentProvider, Postgres, Temporal, dev_approver_keys
from local_platform.seeder import SeedSpec, seed
from worker.connection import connect_temporal
from worker.deployment import set_current_version
from worker.main import activity_list, build_worker, resources


@dataclass
class Stack:
    """Everything a remediation needs, for one benchmark."""

    settings: Settings
    client: Client
    db: asyncpg.Pool


@asynccontextmanager
async def full_stack(root: Path, *, provider: bool = False) -> AsyncIterator[Stack]:
    """The embedded stack on free ports with the platform and one worker (and the payment provider)."""
    settings = Settings(
        REMEDIATION_STATE_DIR=root,
        POSTGRES_PORT=free_port(),
        NATS_PORT=free_port(),
        TEMPORAL_PORT=free_port(),
        TEMPORAL_UI_PORT=free_port(),
        PLATFORM_PORT=free_port(),
        VERIFY_WINDOW_SECONDS=1,
        PAYLOAD_ENCRYPTION="off",
        APPLY_BATCH_SIZE=500,
        PAYMENT_PROVIDER_PORT=free_port(),
        PAYMENT_PROVIDER_URL="",
        # Verification asks Alertmanager (criterion 4): an embedded one, nothing firing.
        ALERTMANAGER_PORT=free_port(),
        ALERTMANAGER_URL=None,
    )
    dev_approver_keys(settings)
    postgres = Postgres(settings)
    servers = [postgres, Nats(settings), Temporal(settings), Alertmanager(settings)]
    if provider:
        servers.append(PaymentProvider(settings))
    for server in servers:
        await asyncio.to_thread(server.start)
    try:
        client = await connect_temporal(settings)
        async with platform_process(settings), resources(settings) as res:
            db = await asyncpg.create_pool(settings.resolved_database_url(), min_size=1, max_size=4)
            async with build_worker(client, settings, res):
                await set_current_version(client, settings)  # versioned, as deployed: new runs go to it
                yield Stack(settings, client, db)
            await db.close()
    finally:
        for server in reversed(servers):
            await asyncio.to_thread(server.stop)
        await asyncio.to_thread(postgres.purge)


def stack_env(settings: Settings) -> dict[str, str]:
    """What a process beside this stack (the platform stand-in, a commander's shell) exports to reach it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "NATS_", "TEMPORAL_"))}
    env.update(
        {
            "REMEDIATION_STATE_DIR": str(settings.state_dir),
            "POSTGRES_PORT": str(settings.postgres_port),
            "NATS_PORT": str(settings.nats_port),
            "TEMPORAL_PORT": str(settings.temporal_port),
            "TEMPORAL_UI_PORT": str(settings.temporal_ui_port),
            "PLATFORM_PORT": str(settings.platform_port),
            "PAYMENT_PROVIDER_PORT": str(settings.payment_provider_port),
            "PAYLOAD_ENCRYPTION": "off",
        }
    )
    return env


@asynccontextmanager
async def platform_process(settings: Settings) -> AsyncIterator[None]:
    """The platform stand-in in its own process (`remediate platform serve`), as `make demo` and production
    run it: in the benchmark's process it shared the worker's event loop (one core) with it."""
    log_file = settings.state_dir / "logs" / "platform.log"
    pid = spawn(
        [sys.executable, "-m", "starters.cli", "platform", "serve"],
        pid_file=settings.state_dir / "platform.pid",
        log_file=log_file,
        env=stack_env(settings),
    )
    try:
        await asyncio.to_thread(
            wait_for_port, settings.platform_port, timeout=60, name="platform", log_file=log_file, pid=pid
        )
        yield
    finally:
        await asyncio.to_thread(stop_pid, pid)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered)) - 1))]


async def bench_workflows(stack: Stack, incidents: int) -> None:
    """``incidents`` concurrent single-user remediations: start to plan ready, vs the activities alone."""
    async with stack.db.acquire() as conn:
        await seed(
            conn,
            SeedSpec(
                # Three users per org: enough distinct users for one incident each.
                orgs=max(5, incidents // 3 + 2),
                allocations=incidents * 20,
                prefix="wf",
                seed=4,
                inject={"orphan_open": incidents * 4},
            ),
        )
    users = [
        r[0]
        for r in await stack.db.fetch(
            """SELECT DISTINCT u.requested_by_user_id FROM billing.usage_records u
               JOIN billing.allocations a ON a.id = u.allocation_id
               WHERE u.end_time IS NULL AND a.status = 'released' LIMIT $1""",
            incidents,
        )
    ]

    handles: list[WorkflowHandle[Any, RemediationResult]] = []

    async def one(user: str) -> float:
        started = time.perf_counter()
        handle = await stack.client.start_workflow(
            names.WORKFLOW,
            RemediationRequest(
                correlation_id=f"bench-{user}",
                scope=Scope(user_id=user),
                requested_by="ic",
                dry_run=True,
                trigger=Trigger.CUSTOMER_DISPUTE,
            ),
            id=f"bench-{user}-{uuid.uuid4().hex[:6]}",
            task_queue=stack.settings.task_queue,
            result_type=RemediationResult,
        )
        handles.append(handle)
        result = await handle.result()
        assert result.plan is not None
        return time.perf_counter() - started

    wall, latencies = await _timed_gather([one(u) for u in users])
    direct = await _direct(stack, users[: min(20, len(users))])
    p50 = statistics.median(latencies)
    emit(
        "workflows",
        incidents=len(users),
        wall_s=round(wall, 1),
        p50_s=round(p50, 2),
        p99_s=round(percentile(latencies, 0.99), 2),
        direct_activities_s=round(direct, 3),
        ratio_p50_to_direct=round(p50 / direct, 1),
        slowest_steps_s=await slowest_steps(handles[len(handles) // 2]),
        note="dry runs, start to result (plan ready + evidence); direct = the same activities called in sequence",
    )


async def slowest_steps(handle: WorkflowHandle[Any, Any], top: int = 4) -> dict[str, float]:
    """Schedule-to-close seconds of the slowest activities in one run (where the time goes)."""
    history = await handle.fetch_history()
    scheduled = {}
    took: dict[str, float] = {}
    for e in history.events:
        if e.HasField("activity_task_scheduled_event_attributes"):
            name = e.activity_task_scheduled_event_attributes.activity_type.name
            scheduled[e.event_id] = (name, e.event_time.ToDatetime())
        if e.HasField("activity_task_completed_event_attributes"):
            name, at = scheduled[e.activity_task_completed_event_attributes.scheduled_event_id]
            took[name] = max(took.get(name, 0.0), (e.event_time.ToDatetime() - at).total_seconds())
    return dict(sorted(took.items(), key=lambda kv: -kv[1])[:top])


async def _timed_gather(jobs: list[Coroutine[Any, Any, float]]) -> tuple[float, list[float]]:
    started = time.perf_counter()
    results = await asyncio.gather(*jobs)
    return time.perf_counter() - started, list(results)


async def _direct(stack: Stack, users: list[str]) -> float:
    """Mean time of the same activities a dry run executes, called one after another without Temporal."""
    env = ActivityEnvironment()
    took = []
    async with resources(stack.settings) as res:
        acts = {fn.__temporal_activity_definition.name: fn for fn in activity_list(stack.settings, res)}  # type: ignore[attr-defined]
        for user in users:
            run_id = uuid.uuid4().hex
            scope = Scope(user_id=user)
            ref = RunRef(run_id=run_id, workflow_id=run_id, correlation_id="direct", scope=scope)
            request = RemediationRequest(
                correlation_id="direct", scope=scope, requested_by="ic", dry_run=True
            )
            started = time.perf_counter()
            await env.run(acts[names.LOAD_RUNTIME_OPTIONS])
            await env.run(acts[names.REGISTER_RUN], RegisterRun(ref=ref, request=request))
            for check in (
                names.CHECK_POSTGRES,
                names.CHECK_CONSUMER,
                names.CHECK_OUTBOX,
                names.QUERY_CORRELATION_LOGS,
                names.READ_EVENT_SEQUENCE,
                names.CHECK_DATA_CONSISTENCY,
            ):
                await env.run(acts[check], ref)
            await env.run(
                acts[names.ASSESS_BLAST_RADIUS],
                BlastRadiusRequest(ref=ref, worker_degraded=False, widespread_org_threshold=3),
            )
            await env.run(acts[names.RECONCILE], ReconcileRequest(ref=ref, pass_no=0))
            await env.run(acts[names.SNAPSHOT_SCOPE], SnapshotRequest(ref=ref, label="before"))
            plan = await env.run(
                acts[names.BUILD_PLAN],
                PlanRequest(ref=ref, pass_no=0, plan_id=f"{run_id}-p0", restart_worker=False),
            )
            await env.run(
                acts[names.CAPTURE_EVIDENCE],
                EvidenceRequest(
                    ref=ref,
                    outcome="dry_run_complete",
                    blast_radius="single",
                    plan_id=plan.plan_id,
                    verification=None,
                    approvers=[],
                ),
            )
            took.append(time.perf_counter() - started)
    return statistics.mean(took)


async def bench_memory(stack: Stack, sizes: list[int]) -> None:
    """History length, largest payload and peak RSS for approved plans of each size (must stay flat).

    Global runs, smallest first: each run repairs its drift, so the next one plans only its own seed.
    """
    for size in sizes:
        prefix = f"m{size}"
        async with stack.db.acquire() as conn:
            await seed(
                conn,
                SeedSpec(
                    orgs=5,
                    allocations=int(size * 1.7),
                    prefix=prefix,
                    seed=6,
                    inject={"unbilled_closed": size},
                    publish_events_limit=0,
                ),
            )
        reset_peak_rss()
        request = RemediationRequest(
            correlation_id=f"mem-{size}", scope=Scope(), requested_by="ic", trigger=Trigger.WORKER_FAILURE
        )
        handle: WorkflowHandle[object, RemediationResult] = await stack.client.start_workflow(
            names.WORKFLOW,
            request,
            id=request.workflow_id(),  # as `remediate start` names it (the approval page checks the form)
            task_queue=stack.settings.task_queue,
            result_type=RemediationResult,
        )
        view = await _wait_plan(handle)
        assert view.plan is not None
        page_ms = await approval_page_ms(stack, handle.id)
        for who in ("alice", "bob")[: view.approvals_needed]:
            body = ApprovalDecision(
                plan_hash=view.plan.plan_hash, approver=who, decision="approve", plan_id=view.plan.plan_id
            )
            await handle.execute_update(names.UPDATE_APPROVE, sign(body, _key(stack, who)))
        started = time.perf_counter()
        result = await handle.result()
        took = time.perf_counter() - started
        history = await handle.fetch_history()
        largest = max(
            (p.ByteSize() for e in history.events for p in _payloads(e)),
            default=0,
        )
        emit(
            "memory",
            plan_actions=view.plan.action_count,
            outcome=result.outcome.value,
            history_events=len(history.events),
            # Workflow-task events vary with how updates and parallel results batch; activities do not.
            activities_scheduled=sum(
                1 for e in history.events if e.HasField("activity_task_scheduled_event_attributes")
            ),
            largest_payload_bytes=largest,
            # The process hosts the worker (and the stand-in); its peak is reset after seeding.
            run_peak_rss_mb=peak_rss_mb(),
            apply_and_verify_s=round(took, 1),
            approval_page_ms=page_ms,
        )


async def approval_page_ms(stack: Stack, workflow_id: str) -> dict[str, float]:
    """Milliseconds to serve the approval page's plan page (first and a later page of actions), in process."""
    settings = stack.settings.model_copy(update={"approvals_token": SecretStr("bench")})
    app = approvals_app(settings, stack.client, stack.db)
    transport = httpx.ASGITransport(app=app)
    took = {}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://bench", headers={"Authorization": "Bearer bench"}
    ) as http:
        for label, query in (("first_page", ""), ("page_after_500", "?after=500")):
            started = time.perf_counter()
            response = await http.get(f"/runs/{workflow_id}{query}")
            took[label] = round((time.perf_counter() - started) * 1000, 1)
            assert response.status_code == 200, f"{response.status_code}: {response.text[-600:]}"
    return took


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """Peak resident set size since the last reset (VmHWM), falling back to the lifetime peak."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _key(stack: Stack, who: str) -> Ed25519PrivateKey:
    return load_private_key(stack.settings.resolved_keys_dir() / f"{who}.key")


async def _wait_plan(handle: WorkflowHandle[object, RemediationResult]) -> StatusView:
    while True:
        view: StatusView = await handle.query(names.QUERY_STATUS, result_type=StatusView)
        if view.phase is Phase.AWAITING_APPROVAL:
            return view
        if view.phase in (Phase.COMPLETED, Phase.FAILED):
            raise RuntimeError(f"run ended before approval: {view.phase}")
        await asyncio.sleep(0.5)


def _payloads(event: HistoryEvent) -> Iterator[Payload]:
    """Every payload an event carries (inputs, results, update arguments)."""
    for field in (
        "workflow_execution_started_event_attributes",
        "activity_task_scheduled_event_attributes",
        "activity_task_completed_event_attributes",
        "workflow_execution_completed_event_attributes",
        "workflow_execution_update_accepted_event_attributes",
        "workflow_execution_update_completed_event_attributes",
    ):
        if event.HasField(field):
            attrs = getattr(event, field)
            for name in ("input", "result"):
                container = getattr(attrs, name, None)
                if container is not None and hasattr(container, "payloads"):
                    yield from container.payloads
