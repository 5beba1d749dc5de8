"""Workers scale horizontally on one task queue: kill the one holding the apply, the other finishes it."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from contracts import names
from contracts.models import Phase, RemediationRequest, Trigger
from local_platform.provider_payments import seeder_for
from local_platform.seeder import SeedSpec, seed
from tests.conftest import World
from tests.faults.harness import WorkerProcess, applied_count, temporal_address
from tests.faults.test_worker_kills import activity_attempts
from tests.helpers import (
    approve_quorum,
    assert_ledger_is_the_plan,
    start,
    wait_phase,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

INJECT = {"unbilled_closed": 500, "orphan_open": 150, "missing_open": 150}


async def test_two_workers_one_killed_mid_apply_the_other_finishes(
    process_world: World, temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    world = process_world
    async with world.db.acquire() as conn, seeder_for(world.settings) as provider:
        await seed(
            conn, SeedSpec(orgs=3, allocations=1500, prefix="two", seed=8, inject=INJECT), provider=provider
        )
    address = temporal_address(temporal_env)
    workers = [WorkerProcess(world.settings, address, tmp_path / f"worker-{i}.log") for i in (1, 2)]
    for w in workers:
        w.start()
    try:
        handle = await start(
            world,
            RemediationRequest(
                correlation_id="two-workers", requested_by="ic-dana", trigger=Trigger.WORKER_FAILURE
            ),
        )
        view = await wait_phase(handle, {Phase.AWAITING_APPROVAL}, timeout=180)
        assert view.plan is not None
        plan = view.plan
        await approve_quorum(handle, view)
        # Wait until the apply is under way, then find the worker holding it from the server's own record.
        deadline = time.monotonic() + 120
        holder = None
        while time.monotonic() < deadline:
            done = await applied_count(world, plan.plan_id)
            pending = [
                p
                for p in (await handle.describe()).raw_description.pending_activities
                if p.activity_type.name == names.APPLY_PLAN and p.last_worker_identity
            ]
            if pending and 40 <= done < plan.action_count - 100:
                holder = pending[0].last_worker_identity
                break
            await asyncio.sleep(0.01)
        assert holder is not None, "the apply never showed a worker mid-way"
        victim = next(w for w in workers if holder == f"{w.pid}@{socket.gethostname()}")
        survivor = next(w for w in workers if w is not victim)
        survivor_identity = f"{survivor.pid}@{socket.gethostname()}"
        victim.kill9()
        killed_at = await applied_count(world, plan.plan_id)
        assert killed_at < plan.action_count
        result = await asyncio.wait_for(handle.result(), timeout=300)
        assert survivor.pid is not None, "the surviving worker must still be running"
    finally:
        for w in workers:
            w.stop()
    assert result.outcome is Phase.COMPLETED, result
    await assert_ledger_is_the_plan(world, plan)
    # The apply was retried once, by the surviving worker, resuming from the audit rows.
    assert await activity_attempts(handle, names.APPLY_PLAN) == 2
    history = await handle.fetch_history()
    apply_scheduled = {
        e.event_id
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == names.APPLY_PLAN
    }
    finished_by = [
        e.activity_task_started_event_attributes.identity
        for e in history.events
        if e.HasField("activity_task_started_event_attributes")
        and e.activity_task_started_event_attributes.scheduled_event_id in apply_scheduled
    ]
    assert finished_by == [survivor_identity]
