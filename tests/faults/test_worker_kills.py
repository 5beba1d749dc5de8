"""kill -9 the worker at seeded points during reconciliation and apply: the ledger ends exactly as approved."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from local_platform.seeder import SeedSpec, seed
from tests.conftest import World
from tests.faults.harness import WorkerProcess, applied_count, assert_ledger_is_the_plan, temporal_address
from tests.test_remediation_workflow import decision, start, wait_phase
from workflows import names
from workflows.models import Phase, RemediationRequest, Trigger

pytestmark = pytest.mark.asyncio(loop_scope="session")

KILL_SEED = 20261125
RECONCILE_KILLS = 4
APPLY_KILLS = 16
INJECT = {"unbilled_closed": 900, "orphan_open": 300, "missing_open": 300, "payment_drift": 60}


async def test_kill_9_at_seeded_points_ledger_equals_the_approved_plan(
    process_world: World, temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    world = process_world
    rng = random.Random(KILL_SEED)
    async with world.db.acquire() as conn:
        report = await seed(conn, SeedSpec(orgs=4, allocations=3000, prefix="kill", seed=5, inject=INJECT))
    assert {k: len(v) for k, v in report.injected.items()} == INJECT
    worker = WorkerProcess(world.settings, temporal_address(temporal_env), tmp_path / "worker.log")
    worker.start()
    try:
        handle = await start(
            world,
            RemediationRequest(
                correlation_id="kill-9", requested_by="ic-dana", trigger=Trigger.WORKER_FAILURE
            ),
        )
        # Kill points before approval: diagnosis, reconciliation and plan building.
        for _ in range(RECONCILE_KILLS):
            await asyncio.sleep(rng.uniform(0.3, 2.5))
            worker.kill9()
            worker.start()
        view = await wait_phase(handle, {Phase.AWAITING_APPROVAL}, timeout=240)
        assert view.plan is not None
        plan = view.plan
        assert plan.action_count == sum(INJECT.values())
        for who in ("alice", "bob"):
            await handle.execute_update(names.UPDATE_APPROVE, decision(view, who))
        # Kill points during apply, at seeded progress marks (inside batches and between them).
        marks = sorted(rng.sample(range(1, plan.action_count - 50), APPLY_KILLS))
        deadline = time.monotonic() + 600
        done_at_kill = 0
        for mark in marks:
            # Each kill waits for the restarted worker to commit new work, so no kill is wasted on a
            # process that is still importing.
            target = max(mark, done_at_kill + 1)
            done = done_at_kill
            while time.monotonic() < deadline and done < target:
                await asyncio.sleep(0.005)
                done = await applied_count(world, plan.plan_id)
            worker.kill9()
            done_at_kill = await applied_count(world, plan.plan_id)
            assert done_at_kill < plan.action_count, "the apply finished before the kill schedule"
            worker.start()
        result = await asyncio.wait_for(handle.result(), timeout=600)
    finally:
        worker.stop()
    assert worker.kills == RECONCILE_KILLS + APPLY_KILLS
    assert result.outcome is Phase.COMPLETED, result
    await assert_ledger_is_the_plan(world, plan)
    # The kills really interrupted the apply: it took several attempts (each resumed from the audit rows).
    attempts = await activity_attempts(handle, names.APPLY_PLAN)
    assert attempts == APPLY_KILLS + 1, attempts


async def activity_attempts(handle: Any, activity_name: str) -> int:
    """The attempt number of the last start of ``activity_name`` in the run's history."""
    history = await handle.fetch_history()
    names_by_event = {
        e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    }
    return max(
        int(e.activity_task_started_event_attributes.attempt)
        for e in history.events
        if e.HasField("activity_task_started_event_attributes")
        and names_by_event[e.activity_task_started_event_attributes.scheduled_event_id] == activity_name
    )
