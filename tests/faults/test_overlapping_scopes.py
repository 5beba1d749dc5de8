"""Two remediations on overlapping scopes (an org, and a user in it) never apply an action twice."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from contracts.models import Phase, RemediationRequest, RemediationResult, Scope, StatusView, Trigger
from tests.conftest import World
from tests.helpers import (
    DRIFT_SQL,
    approve_quorum,
    drift,
    incident_in,
    start,
    wait_phase,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def approved(handle: Any, view: StatusView) -> RemediationResult:
    await approve_quorum(handle, view)
    result: RemediationResult = await handle.result()
    return result


async def test_org_and_user_runs_apply_each_fix_once(world: World) -> None:
    await incident_in(world, "worker-crash", "ov")
    # A user whose drift both runs will see.
    row = await world.db.fetchrow(
        """SELECT a.org_id, a.requested_by_user_id AS user_id FROM billing.usage_records u
           JOIN billing.allocations a ON a.id = u.allocation_id
           WHERE u.end_time IS NOT NULL AND u.accrued_cost_minor > 0
             AND u.id NOT IN (SELECT usage_record_id FROM billing.ledger_entries WHERE usage_record_id IS NOT NULL)
           ORDER BY a.id LIMIT 1"""
    )
    assert row is not None
    org_run = await start(
        world,
        RemediationRequest(
            correlation_id="overlap-org",
            scope=Scope(org_id=row["org_id"]),
            requested_by="ic",
            trigger=Trigger.MANUAL,
        ),
    )
    user_run = await start(
        world,
        RemediationRequest(
            correlation_id="overlap-user",
            scope=Scope(org_id=row["org_id"], user_id=row["user_id"]),
            requested_by="ic",
            trigger=Trigger.CUSTOMER_DISPUTE,
        ),
    )
    assert org_run.id != user_run.id
    org_view, user_view = await asyncio.gather(
        wait_phase(org_run, {Phase.AWAITING_APPROVAL}), wait_phase(user_run, {Phase.AWAITING_APPROVAL})
    )
    assert org_view.plan is not None and user_view.plan is not None
    org_keys = {
        r[0]
        for r in await world.db.fetch(
            "SELECT idempotency_key FROM remediation.plan_actions WHERE plan_id = $1", org_view.plan.plan_id
        )
    }
    user_keys = {
        r[0]
        for r in await world.db.fetch(
            "SELECT idempotency_key FROM remediation.plan_actions WHERE plan_id = $1", user_view.plan.plan_id
        )
    }
    shared = org_keys & user_keys
    assert shared, "the two plans must overlap for this test to mean anything"
    # Neither scoped run restarts the platform-wide worker; the platform-wide remediation (or an operator)
    # does, through the admin API, so both runs can verify that the worker processes again.
    assert "restart_billing_worker" not in org_view.plan.counts_by_kind | user_view.plan.counts_by_kind
    async with httpx.AsyncClient(base_url=world.settings.resolved_billing_api_url(), timeout=10) as http:
        restarted = await http.post(
            "/api/v1/admin/billing-worker/restart",
            json={"actor": "ic", "correlation_id": "overlap-global"},
            headers={"Authorization": f"Bearer {world.settings.billing_api_token.get_secret_value()}"},
        )
    assert restarted.status_code == 200, restarted.text
    # Both approved at once: the applies race on the same rows.
    org_result, user_result = await asyncio.gather(approved(org_run, org_view), approved(user_run, user_view))
    assert org_result.outcome is Phase.COMPLETED and user_result.outcome is Phase.COMPLETED
    outcomes = await world.db.fetch(
        """SELECT idempotency_key, array_agg(outcome ORDER BY outcome) AS outcomes FROM remediation.applied_actions
           WHERE plan_id = ANY($1::text[]) GROUP BY idempotency_key""",
        [org_view.plan.plan_id, user_view.plan.plan_id],
    )
    for r in outcomes:
        if r["idempotency_key"] in shared:
            # One run applied it; the other re-checked, found it already done (by whom) and wrote nothing.
            assert r["outcomes"] == ["already_applied", "applied"], dict(r)
    assert (
        await world.db.fetchval(
            "SELECT count(*) - count(DISTINCT idempotency_key) FROM billing.ledger_entries"
        )
        == 0
    )
    in_org = {k: v for k, v in (await drift(world)).items() if k in DRIFT_SQL}
    org_alloc_drift = await world.db.fetchval(
        "SELECT count(*) FROM billing.allocations WHERE org_id = $1 AND id = ANY($2::text[])",
        row["org_id"],
        [a for ids in in_org.values() for a in ids],
    )
    assert org_alloc_drift == 0
