"""Every incident scenario of the stand-in, held to the same promises.

For each: the plan lists exactly the injected drift; nothing changes before approval; a rejection
changes nothing; after approval the drift is gone by independent SQL; no idempotency key is used
twice; re-running changes nothing; the freeze is lifted on every path.
"""

from __future__ import annotations

from typing import Any

import pytest

from contracts.models import BlastRadius, Phase, RemediationRequest, StatusView
from local_platform.incidents import INCIDENTS
from tests.conftest import World
from tests.helpers import (
    approve,
    approve_quorum,
    assert_ledger_is_the_plan,
    decision,
    drift,
    incident_in,
    ledger_state,
    request_for,
    start,
    wait_phase,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Which drift kind (the incident's own vocabulary) each corrective action answers.
ACTION_FIXES = {
    "open_usage_record": "missing_open",
    "close_orphan_usage": "orphan_open",
    "post_usage_debit": "unbilled_closed",
    "credit_payment": "payment_drift",
    "link_payment_credit": "payment_drift",
    "mark_payment_failed": "payment_unpaid",
    "investigate_payment": "payment_investigate",
}
# The provider's outcomes a human investigates (never applied).
INVESTIGATED = ("payment_refunded", "payment_amount_mismatch")


def as_found(injected: dict[str, set[str]]) -> dict[str, set[str]]:
    """What independent SQL sees: every failed payment, whatever the provider says, is payment drift."""
    out: dict[str, set[str]] = {}
    for kind, ids in injected.items():
        out.setdefault("payment_drift" if kind.startswith("payment_") else kind, set()).update(ids)
    return out


def as_planned(injected: dict[str, set[str]]) -> dict[str, set[str]]:
    """What the plan answers: refunded and other-amount payments are both investigated."""
    out: dict[str, set[str]] = {}
    for kind, ids in injected.items():
        out.setdefault("payment_investigate" if kind in INVESTIGATED else kind, set()).update(ids)
    return out


# Actions that repair a process or a posture rather than one drifted row.
NON_ROW_ACTIONS = {"restart_billing_worker", "rollback_billing_worker", "clear_financial_restriction"}


async def planned_drift(world: World, plan_id: str) -> dict[str, set[str]]:
    """The plan's row actions as drift kind -> allocation (usage actions) or payment session ids."""
    rows = await world.db.fetch(
        """SELECT pa.kind, coalesce(u.allocation_id, pa.entity_id) AS target
           FROM remediation.plan_actions pa
           LEFT JOIN billing.usage_records u
             ON u.id = CASE WHEN pa.kind IN ('close_orphan_usage', 'post_usage_debit')
                            THEN pa.entity_id::bigint END
           WHERE pa.plan_id = $1""",
        plan_id,
    )
    found: dict[str, set[str]] = {}
    for r in rows:
        if r["kind"] in NON_ROW_ACTIONS:
            continue
        found.setdefault(ACTION_FIXES[r["kind"]], set()).add(r["target"])
    return found


async def open_freezes(world: World) -> int:
    return int(
        await world.db.fetchval("SELECT count(*) FROM billing.adjustment_freezes WHERE lifted_at IS NULL")
    )


async def awaiting(world: World, request: RemediationRequest) -> tuple[Any, StatusView]:
    handle = await start(world, request)
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert view.plan is not None
    # Frozen exactly when the blast radius is widespread, and the admin API holds that freeze.
    assert view.frozen == (view.blast_radius is BlastRadius.WIDESPREAD)
    assert await open_freezes(world) == (1 if view.frozen else 0)
    return handle, view


@pytest.mark.parametrize("name", INCIDENTS)
async def test_every_incident_reject_then_approve_then_rerun(world: World, name: str) -> None:
    incident = await incident_in(world, name, name[:2])
    injected = {k: set(v) for k, v in incident.injected.items() if v}
    # Independent SQL sees exactly what the incident says it injected.
    assert {k: v for k, v in (await drift(world)).items() if v} == as_found(injected)
    request = request_for(incident)
    ledger_before = await ledger_state(world)

    # Rejected: nothing changes, the freeze is lifted.
    handle, view = await awaiting(world, request)
    assert await planned_drift(world, view.plan.plan_id) == as_planned(injected)  # type: ignore[union-attr]
    assert await ledger_state(world) == ledger_before
    await approve(handle, decision(view, "carol", "reject"))
    assert (await handle.result()).outcome is Phase.REJECTED
    assert await ledger_state(world) == ledger_before
    assert {k: v for k, v in (await drift(world)).items() if v} == as_found(injected)
    assert await open_freezes(world) == 0

    # Started again and approved by the quorum: exactly the drift is repaired.
    handle, view = await awaiting(world, request)
    plan = view.plan
    assert plan is not None and await planned_drift(world, plan.plan_id) == as_planned(injected)
    assert await ledger_state(world) == ledger_before
    await approve_quorum(handle, view)
    result = await handle.result()
    assert result.outcome is Phase.COMPLETED, result
    assert result.verification is not None and result.verification.passed
    await assert_ledger_is_the_plan(world, plan)
    assert await open_freezes(world) == 0

    # Re-running on the repaired platform finds nothing to change (investigations stay follow-ups).
    ledger_after = await ledger_state(world)
    again = await start(world, request)
    second = await again.result()
    assert second.outcome is Phase.COMPLETED, second
    assert second.plan is not None and second.plan.empty
    investigated = {pay for kind in INVESTIGATED for pay in injected.get(kind, set())}
    assert second.plan.counts_by_kind.get("investigate_payment", 0) == len(investigated)
    assert await ledger_state(world) == ledger_after
    assert await open_freezes(world) == 0
