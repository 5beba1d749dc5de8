"""A run's freeze and quorum follow its own scope and plan (issue 13.7): a user's dispute during a wider
degradation is not frozen or quorum-gated by other orgs' drift; the degradation is a named finding
that points to the platform-wide remediation, or says none is running."""

from __future__ import annotations

import pytest

import remediation_client as operations
from activities.postgres.platform_summary import refresh_platform_summary
from contracts.models import (
    ApprovalPolicy,
    ApproverInfo,
    BlastRadius,
    Phase,
    PlanSummary,
    RemediationRequest,
    Trigger,
)
from local_platform.seeder import SeedSpec, seed
from tests.helpers import start, start_dispute, wait_phase
from workflows.approval import approvals_required

from .conftest import World


async def _orgs_with_drift(world: World) -> int:
    return int(
        await world.db.fetchval(
            """SELECT count(DISTINCT org_id) FROM (
                 SELECT u.org_id FROM billing.usage_records u WHERE u.end_time IS NOT NULL
                   AND u.accrued_cost_minor > 0 AND NOT EXISTS (SELECT 1 FROM billing.ledger_entries l
                   WHERE l.usage_record_id = u.id AND l.kind = 'usage_debit')
                 UNION ALL SELECT p.org_id FROM billing.payment_sessions p WHERE p.status = 'failed_reconcile'
                   OR (p.status = 'completed' AND p.ledger_entry_id IS NULL)
                 UNION ALL SELECT a.org_id FROM billing.allocations a WHERE a.status IN ('active','releasing','release_failed')
                   AND NOT EXISTS (SELECT 1 FROM billing.usage_records u WHERE u.allocation_id = a.id AND u.end_time IS NULL)
               ) d"""
        )
    )


@pytest.mark.asyncio(loop_scope="session")
async def test_a_dispute_keeps_its_own_risk_and_names_the_wider_degradation(world: World) -> None:
    # Drift in other orgs, beyond WIDESPREAD_ORG_THRESHOLD: a platform-wide problem is going on.
    async with world.db.acquire() as conn:
        await seed(
            conn,
            SeedSpec(
                orgs=5,
                allocations=100,
                prefix="wd",
                seed=31,
                inject={"unbilled_closed": 8, "payment_drift": 6},
            ),
            world.nc,
        )
    assert await _orgs_with_drift(world) >= world.settings.widespread_org_threshold
    # What the worker's background refresh measures: a dispute reads it instead of scanning the platform.
    assert await refresh_platform_summary(world.db)
    # ... and the billing worker is down with a backlog over 1,000: its consumer is critical.
    await world.db.execute("UPDATE billing.worker_control SET mode = 'crashed'")
    for n in range(1_001):
        await world.nc.publish("provisioning.active", f'{{"allocation_id": "wd-none-{n}"}}'.encode())
    await world.nc.flush()

    _, dispute = await start_dispute(world, "rd")
    view = await wait_phase(dispute, {Phase.AWAITING_APPROVAL})
    # Only the dispute's own row: never a platform-wide worker restart, even with the consumer degraded.
    assert view.plan is not None and view.plan.action_count == 1
    assert "restart_billing_worker" not in view.plan.counts_by_kind
    # The dispute's own risk: one user, one row, little money: no freeze, one approver.
    assert view.blast_radius is BlastRadius.SINGLE
    assert not view.frozen
    assert (
        await world.db.fetchval("SELECT count(*) FROM billing.adjustment_freezes WHERE lifted_at IS NULL")
        == 0
    )
    assert view.approvals_needed == 1
    finding = next(c for c in view.diagnosis if c.check == "platform_degradation")
    assert finding.status == "warn"
    assert "outside this run's scope: billing worker consumer is critical" in finding.headline
    assert "; drift in" in finding.headline
    assert "no platform-wide remediation is running: start one with `remediate start" in finding.headline
    await operations.abort(world.client, dispute.id)

    # With the platform-wide remediation running, the finding names it; that run carries the freeze and quorum.
    global_run = await start(
        world,
        RemediationRequest(
            correlation_id="wd-global", requested_by="ic-dana", trigger=Trigger.WORKER_FAILURE
        ),
    )
    global_view = await wait_phase(global_run, {Phase.AWAITING_APPROVAL})
    assert global_view.blast_radius is BlastRadius.WIDESPREAD and global_view.frozen
    assert global_view.approvals_needed == 2
    assert not any(c.check == "platform_degradation" for c in global_view.diagnosis)
    _, second = await start_dispute(world, "re")
    view = await wait_phase(second, {Phase.AWAITING_APPROVAL})
    assert view.blast_radius is BlastRadius.SINGLE and view.approvals_needed == 1
    finding = next(c for c in view.diagnosis if c.check == "platform_degradation")
    description = await global_run.describe()
    assert f"{global_run.id} is running (run {description.run_id}, correlation wd-global" in finding.headline
    await operations.abort(world.client, second.id)
    # Terminated from outside, the global run never records its end: the finding asks Temporal, not the
    # runs table, and does not send a commander to a run that is gone.
    await global_run.terminate("operator stopped it")
    _, third = await start_dispute(world, "rf")
    view = await wait_phase(third, {Phase.AWAITING_APPROVAL})
    finding = next(c for c in view.diagnosis if c.check == "platform_degradation")
    assert "no platform-wide remediation is running" in finding.headline, finding.headline
    await operations.abort(world.client, third.id)


def test_quorum_follows_money_rows_and_breadth_of_the_plan() -> None:
    policy = ApprovalPolicy(
        approvers=[ApproverInfo(name=n, role="r", tier=1) for n in ("alice", "bob", "carol")],
        quorum=2,
        money_threshold_minor=100_000,
        deadline_seconds=60,
        hard_limit_seconds=600,
        rows_threshold=1_000,
    )

    def plan(actions: int, money: int) -> PlanSummary:
        return PlanSummary(
            plan_id="p",
            plan_hash="0" * 64,
            action_count=actions,
            counts_by_kind={},
            debit_total_minor=money,
            credit_total_minor=0,
        )

    assert approvals_required(policy, plan(5, 1_000), BlastRadius.SINGLE) == 1
    assert approvals_required(policy, plan(5, 1_000), BlastRadius.ORG) == 1
    assert approvals_required(policy, plan(5, 1_000), BlastRadius.WIDESPREAD) == 2
    assert approvals_required(policy, plan(5, 100_001), BlastRadius.SINGLE) == 2
    assert approvals_required(policy, plan(1_001, 1_000), BlastRadius.SINGLE) == 2
    assert (
        approvals_required(policy.model_copy(update={"rows_threshold": None}), plan(1_001, 1_000), None) == 1
    )
