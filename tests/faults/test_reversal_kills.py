"""kill -9 the worker while a reversal applies: every entry the run posted ends with exactly one inverse."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

import remediation_client as operations
from contracts import names
from contracts.models import Phase, RemediationRequest, Trigger
from local_platform.provider_payments import seeder_for
from local_platform.seeder import SeedSpec, seed
from tests.conftest import World
from tests.faults.harness import WorkerProcess, applied_count, notice_dead_clients, temporal_address
from tests.faults.test_worker_kills import activity_attempts, finished
from tests.helpers import approve, approve_quorum, decision, start, wait_phase

pytestmark = pytest.mark.asyncio(loop_scope="session")

INJECT = {"unbilled_closed": 400, "orphan_open": 60, "missing_open": 60, "payment_drift": 10}
KILLS = 5


async def test_kill_9_mid_reversal_leaves_exactly_one_inverse_per_entry(
    process_world: World, temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    world = process_world
    rng = random.Random(20261204)
    async with world.db.acquire() as conn, seeder_for(world.settings) as provider:
        await seed(
            conn, SeedSpec(orgs=3, allocations=1200, prefix="rk", seed=7, inject=INJECT), provider=provider
        )
    balances = {
        r["org_id"]: int(r["b"])
        for r in await world.db.fetch(
            "SELECT org_id, sum(amount_minor) AS b FROM billing.ledger_entries GROUP BY 1"
        )
    }
    await notice_dead_clients(world)
    worker = WorkerProcess(world.settings, temporal_address(temporal_env), tmp_path / "worker.log")
    worker.start()
    try:
        original = await start(
            world,
            RemediationRequest(correlation_id="rk-1", requested_by="ic-dana", trigger=Trigger.WORKER_FAILURE),
        )
        view = await wait_phase(original, {Phase.AWAITING_APPROVAL}, timeout=240)
        await approve_quorum(original, view)
        done = await finished(original, tmp_path)
        assert done.outcome is Phase.COMPLETED, done

        request = await operations.reversal_request(
            world.settings,
            original.id,
            scope=None,
            reason="test: reverse under kill -9",
            requested_by="ic-dana",
        )
        reversal = await start(world, request)
        view = await wait_phase(reversal, {Phase.AWAITING_APPROVAL}, timeout=120)
        assert view.plan is not None
        plan = view.plan
        for who in ("alice", "bob"):
            await approve(reversal, decision(view, who), f"approve-{who}")
        marks = sorted(rng.sample(range(1, plan.action_count - 40), KILLS))
        deadline = time.monotonic() + 300
        at_kill = 0
        for mark in marks:
            target, now = max(mark, at_kill + 1), at_kill
            while time.monotonic() < deadline and now < target:
                await asyncio.sleep(0.005)
                now = await applied_count(world, plan.plan_id)
            worker.kill9()
            at_kill = await applied_count(world, plan.plan_id)
            assert at_kill < plan.action_count, "the reversal finished before the kill schedule"
            worker.start()
        result = await finished(reversal, tmp_path)
    finally:
        worker.stop()
    assert result.outcome is Phase.COMPLETED, result
    assert worker.kills == KILLS
    assert await activity_attempts(reversal, names.APPLY_PLAN) == KILLS + 1
    # Every entry the original posted has exactly one inverse; balances are back to before it.
    counts = await world.db.fetchrow(
        """SELECT count(*) AS entries,
                  count(*) FILTER (WHERE (SELECT count(*) FROM billing.ledger_entries r
                                          WHERE r.reverses_entry_id = l.id) = 1) AS once
           FROM billing.ledger_entries l WHERE l.actor LIKE 'remediation:%' AND l.kind <> 'reversal'"""
    )
    assert counts["entries"] > 400 and counts["once"] == counts["entries"], dict(counts)
    assert (
        await world.db.fetchval("SELECT count(*) FROM billing.ledger_entries WHERE kind = 'reversal'")
        == counts["entries"]
    )
    after = {
        r["org_id"]: int(r["b"])
        for r in await world.db.fetch(
            "SELECT org_id, sum(amount_minor) AS b FROM billing.ledger_entries GROUP BY 1"
        )
    }
    assert after == balances
