"""A plan's customer balances: the first customers' read with the plan, the rest while it waits for approval,
every one before anything is applied, each equal to the ledger's sum (issue 29: a platform-wide plan's
balances summed most of the ledger on the path to the plan)."""

from __future__ import annotations

import pytest

import activities.postgres.plan as plan_activities
import remediation_client as operations
from contracts.models import Phase, RemediationRequest, Trigger
from tests.conftest import World
from tests.helpers import approve_quorum, eventually, incident_in, start, wait_phase

ORG_SUMS = "SELECT org_id, sum(amount_minor)::bigint AS b FROM billing.ledger_entries GROUP BY org_id"
USER_SUMS = """SELECT org_id, requested_by_user_id AS user_id, sum(amount_minor)::bigint AS b
               FROM billing.ledger_entries GROUP BY 1, 2"""


@pytest.mark.asyncio(loop_scope="session")
async def test_balances_past_the_first_customers_are_read_while_the_plan_waits_and_all_before_apply(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One org and one user read with the plan: the rest must come from the read beside the approval.
    monkeypatch.setattr(plan_activities, "READ_WITH_PLAN", 1)
    incident = await incident_in(world, "worker-crash", "pb")
    orgs_before = {r["org_id"]: r["b"] for r in await world.db.fetch(ORG_SUMS)}
    users_before = {(r["org_id"], r["user_id"]): r["b"] for r in await world.db.fetch(USER_SUMS)}
    handle = await start(
        world,
        RemediationRequest(
            correlation_id=incident.correlation_id, trigger=Trigger.WORKER_FAILURE, requested_by="ic-dana"
        ),
    )
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert view.plan is not None
    plan_id = view.plan.plan_id
    run_id = (await handle.describe()).run_id

    async def read_later() -> str | None:
        message: str | None = await world.db.fetchval(
            "SELECT message FROM remediation.timeline WHERE run_id = $1 AND message LIKE '%read while it waits%'",
            run_id,
        )
        return message

    message = await eventually(read_later, what="the balances read beside the approval")
    orgs = {
        r["org_id"]: r["balance_before_minor"]
        for r in await world.db.fetch(
            "SELECT org_id, balance_before_minor FROM remediation.plan_customers WHERE plan_id = $1", plan_id
        )
    }
    users = {
        (r["org_id"], r["user_id"]): r["balance_before_minor"]
        for r in await world.db.fetch(
            "SELECT org_id, user_id, balance_before_minor FROM remediation.plan_user_balances WHERE plan_id = $1",
            plan_id,
        )
    }
    assert len(orgs) >= 2 and len(users) >= 2, (orgs, users)
    # All but the first org and the first user were read after the plan was built ...
    assert f"the balances of {len(orgs) + len(users) - 2} more customers and users" in message, message
    # ... and every balance, read with the plan or after it, is the ledger's sum (nothing applied yet).
    assert orgs == {org: orgs_before.get(org, 0) for org in orgs}
    assert users == {key: users_before.get(key, 0) for key in users}
    shown, shown_users = await operations.customer_balances(world.settings, plan_id, limit=1000)
    assert all(c["balance_after"] is not None for c in shown) and all(
        u["balance_after"] is not None for u in shown_users
    )

    await approve_quorum(handle, view)
    result = await handle.result()
    assert result.outcome is Phase.COMPLETED, result
    # After apply every org and user the plan touched is compared with its prediction, and each is exact.
    document = await operations.evidence(world.settings, handle.id)
    compared = document["balances"]
    assert len(compared) == len(orgs) + len(users), compared
    assert all(b["difference"] == 0 and b["explained"] == "as predicted" for b in compared), compared
