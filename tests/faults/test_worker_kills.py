"""kill -9 the worker at seeded points during reconciliation and apply: the ledger ends exactly as approved.

Kills before approval are pinned where they must land: the test holds the findings (then the plan
actions) table locked until the worker's own statement waits on it, so the worker dies provably
inside a reconcile check's (or the plan's) open transaction, not merely "some time before approval".
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from contracts import names
from contracts.models import Phase, RemediationRequest, Trigger
from local_platform.provider_payments import seeder_for
from local_platform.seeder import SeedSpec, seed
from tests.conftest import World
from tests.faults.harness import (
    WorkerProcess,
    applied_count,
    notice_dead_clients,
    pinned,
    temporal_address,
)
from tests.helpers import (
    approve_quorum,
    assert_ledger_is_the_plan,
    start,
    wait_phase,
)
from tests.histories import keep_history, replay_failure

pytestmark = pytest.mark.asyncio(loop_scope="session")

KILL_SEED = 20261125
EARLY_KILLS = 2  # at seeded times before reconciliation (starting up or diagnosing; the pin holds it back)
RECONCILE_KILLS = 2  # inside the reconcile checks' INSERT ... SELECT, first attempt and its retry
PLAN_KILLS = 1  # inside building the plan, its plan row written but not committed
APPLY_KILLS = 16
INJECT = {"unbilled_closed": 900, "orphan_open": 300, "missing_open": 300, "payment_drift": 60}


async def test_kill_9_at_seeded_points_ledger_equals_the_approved_plan(
    process_world: World, temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    world = process_world
    rng = random.Random(KILL_SEED)
    async with world.db.acquire() as conn, seeder_for(world.settings) as provider:
        spec = SeedSpec(orgs=4, allocations=3000, prefix="kill", seed=5, inject=INJECT)
        report = await seed(conn, spec, provider=provider)
    assert {k: len(v) for k, v in report.injected.items()} == INJECT
    await notice_dead_clients(world)
    worker = WorkerProcess(world.settings, temporal_address(temporal_env), tmp_path / "worker.log")
    worker.start()
    try:
        async with pinned(
            world, "remediation.findings", "INSERT INTO remediation.findings (run_id, pass"
        ) as pin:
            handle = await start(
                world,
                RemediationRequest(
                    correlation_id="kill-9", requested_by="ic-dana", trigger=Trigger.WORKER_FAILURE
                ),
            )
            for _ in range(EARLY_KILLS):
                await asyncio.sleep(rng.uniform(0.3, 2.0))
                worker.kill9()
                worker.start()
            for _ in range(RECONCILE_KILLS):
                await pin.kill_inside(worker)
        async with pinned(
            world, "remediation.plan_actions", "INSERT INTO remediation.plan_actions (plan_id"
        ) as pin:
            for _ in range(PLAN_KILLS):
                await pin.kill_inside(worker)
        view = await wait_phase(handle, {Phase.AWAITING_APPROVAL}, timeout=240)
        assert view.plan is not None
        plan = view.plan
        assert plan.action_count == sum(INJECT.values())
        await approve_quorum(handle, view)
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
        result = await finished(handle, tmp_path)
    finally:
        worker.stop()
    assert worker.kills == EARLY_KILLS + RECONCILE_KILLS + PLAN_KILLS + APPLY_KILLS
    assert result.outcome is Phase.COMPLETED, result
    await assert_ledger_is_the_plan(world, plan)
    # The kills really interrupted the apply: it took several attempts (each resumed from the audit rows).
    attempts = await activity_attempts(handle, names.APPLY_PLAN)
    assert attempts == APPLY_KILLS + 1, attempts
    # The pinned kills cut the reconcile and plan activities too; the retries finished them once.
    # (An early kill may also have landed in a reconcile attempt, hence "at least".)
    assert await activity_attempts(handle, names.RECONCILE) >= RECONCILE_KILLS + 1
    assert await activity_attempts(handle, names.BUILD_PLAN) >= PLAN_KILLS + 1
    # The approvals raced a query that had run the workflow ahead of its last task (the kill inside
    # the plan leaves the next task on the dead worker's queue): the history still replays.
    await keep_history(handle, "approved_after_worker_kills")
    assert await replay_failure(await handle.fetch_history()) is None


async def finished(handle: Any, tmp_path: Path, timeout: float = 150) -> Any:
    """The run's result; if it does not finish, its history is kept beside the worker log for replay."""
    try:
        return await asyncio.wait_for(handle.result(), timeout=timeout)
    except TimeoutError:
        path = tmp_path / "history.json"
        path.write_text((await handle.fetch_history()).to_json())
        raise AssertionError(f"the run did not finish in {timeout}s; its history: {path}") from None


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
