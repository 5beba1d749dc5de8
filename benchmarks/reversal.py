"""Reversal throughput: the apply benchmark's run taken back in full, beside its forward apply."""

from __future__ import annotations

import time

import asyncpg
from temporalio.testing import ActivityEnvironment

from activities.postgres import BillingDatabaseActivities
from benchmarks.report import emit
from contracts.models import ApplyRequest, ReversalPlanRequest, ReversalTarget, RunRef, Scope


async def bench_reversal(
    pool: asyncpg.Pool,
    env: ActivityEnvironment,
    acts: BillingDatabaseActivities,
    original: RunRef,
    forward: float,
) -> None:
    """Plan and apply the exact inverse of ``original``'s applied plan; ``forward`` is its apply's actions/s."""
    workflow_id = f"remediation-{original.run_id}"
    await pool.execute(
        "UPDATE remediation.runs SET workflow_id = $2, ended_at = now() WHERE run_id = $1",
        original.run_id,
        workflow_id,
    )
    ref = RunRef(
        run_id="bench-reversal", workflow_id=f"remediation-reversal-{original.run_id}", correlation_id="bench"
    )
    await pool.execute(
        """INSERT INTO remediation.runs (run_id, workflow_id, correlation_id, trigger, scope, requested_by, dry_run)
           VALUES ($1, $2, 'bench', 'reversal', $3, 'bench', false)""",
        ref.run_id,
        ref.workflow_id,
        Scope().model_dump_json(),
    )
    target = ReversalTarget(workflow_id=workflow_id, run_id=original.run_id, reason="benchmark")
    started = time.perf_counter()
    plan = await env.run(
        acts.build_reversal_plan, ReversalPlanRequest(ref=ref, plan_id="bench-reversal-p0", target=target)
    )
    planned = time.perf_counter() - started
    request = ApplyRequest(
        ref=ref,
        plan_id=plan.plan_id,
        plan_hash=plan.plan_hash,
        actor="bench",
        approvers=["b"],
        batch_size=500,
    )
    started = time.perf_counter()
    summary = await env.run(acts.apply_plan, request)
    took = time.perf_counter() - started
    unreversed = await pool.fetchval(
        """SELECT count(*) FROM billing.ledger_entries
           WHERE actor = 'remediation:bench' AND kind <> 'reversal' AND reversed_by_entry_id IS NULL"""
    )
    rate = summary.applied / took
    emit(
        "reversal",
        actions=plan.action_count,
        applied=summary.applied,
        plan_seconds=round(planned, 2),
        apply_seconds=round(took, 2),
        actions_per_s=round(rate),
        forward_apply_actions_per_s=round(forward),
        reversal_vs_forward=round(rate / forward, 2),
        entries_left_unreversed=unreversed,
    )
