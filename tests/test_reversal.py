"""Take money back safely: a reversal posts the exact inverse of what a run applied (issue 27).

Each test runs the worker-crash incident to completion on the real servers, then reverses it: in full,
in part, after the platform changed a row, twice. Independent SQL compares every balance and row with
the snapshot taken before the original run.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from asyncpg import Record
from pydantic import SecretStr
from typer.testing import CliRunner

import remediation_client as operations
from approval_page.app import approvals_app
from contracts import names
from contracts.models import (
    CREDIT_REVOKED,
    Phase,
    RemediationRequest,
    Scope,
    StatusView,
    Trigger,
    VerdictDecision,
)
from local_platform.provider_payments import seeder_for
from starters.cli import app
from starters.render import render_evidence_markdown
from tests.conftest import World
from tests.helpers import (
    approve,
    approve_quorum,
    decision,
    incident_in,
    refused,
    start,
    verify_evidence,
    wait_phase,
)
from tests.histories import keep_history

ROWS = """SELECT 'usage:' || id, to_jsonb(u)::text FROM billing.usage_records u
          UNION ALL SELECT 'payment:' || id, to_jsonb(p)::text FROM billing.payment_sessions p"""


async def _balances(world: World) -> dict[str, int]:
    rows = await world.db.fetch(
        "SELECT org_id, sum(amount_minor) AS b FROM billing.ledger_entries GROUP BY org_id"
    )
    return {r["org_id"]: int(r["b"]) for r in rows}


async def _user_balances(world: World) -> dict[tuple[str, str], int]:
    rows = await world.db.fetch(
        "SELECT org_id, requested_by_user_id AS u, sum(amount_minor) AS b FROM billing.ledger_entries GROUP BY 1, 2"
    )
    return {(r["org_id"], r["u"]): int(r["b"]) for r in rows}


async def _rows(world: World) -> dict[str, str]:
    return {r[0]: r[1] for r in await world.db.fetch(ROWS)}


async def _remediated(
    world: World, prefix: str
) -> tuple[str, dict[str, int], dict[tuple[str, str], int], dict[str, str]]:
    """The worker-crash incident remediated to completion: (workflow id, org and user balances and rows
    before it)."""
    incident = await incident_in(world, "worker-crash", prefix)
    balances, users, rows = await _balances(world), await _user_balances(world), await _rows(world)
    handle = await start(
        world,
        RemediationRequest(
            correlation_id=incident.correlation_id,
            trigger=Trigger.WORKER_FAILURE,
            requested_by="ic-dana",
        ),
    )
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    await approve_quorum(handle, view)
    result = await handle.result()
    assert result.outcome is Phase.COMPLETED, result
    assert result.plan is not None
    # Predicted balances equal actual ones after apply (the demo's incident).
    document = await operations.evidence(world.settings, handle.id)
    assert document["balances"], document["balances"]
    assert all(b["difference"] == 0 and b["explained"] == "as predicted" for b in document["balances"]), (
        document["balances"]
    )
    return handle.id, balances, users, rows


async def _reverse(
    world: World, workflow_id: str, *, requested_by: str = "alice", dry_run: bool = False, **scope: str
) -> Any:
    request = await operations.reversal_request(
        world.settings,
        workflow_id,
        scope=Scope(**scope) if scope else None,
        reason="plan priced usage wrongly",
        requested_by=requested_by,
        dry_run=dry_run,
    )
    return await start(world, request)


async def _posted_by(world: World, workflow_id: str) -> list[dict[str, Any]]:
    """The ledger entries the original run posted, each with its reversals."""
    rows = await world.db.fetch(
        """SELECT l.id, l.org_id, l.amount_minor, l.reversed_by_entry_id,
                  (SELECT count(*) FROM billing.ledger_entries r WHERE r.reverses_entry_id = l.id) AS reversals,
                  (SELECT r.amount_minor FROM billing.ledger_entries r WHERE r.reverses_entry_id = l.id) AS inverse
           FROM billing.ledger_entries l
           WHERE l.kind <> 'reversal' AND l.correlation_id = (
               SELECT correlation_id FROM remediation.runs WHERE workflow_id = $1 AND trigger <> 'reversal'
               ORDER BY started_at DESC LIMIT 1) AND l.actor LIKE 'remediation:%'""",
        workflow_id,
    )
    return [dict(r) for r in rows]


async def test_full_reversal_restores_every_balance_and_row(world: World) -> None:
    workflow_id, balances, user_balances, rows = await _remediated(world, "rv")
    assert await _balances(world) != balances
    posted = await _posted_by(world, workflow_id)
    assert len(posted) == 7  # 4 debits, 2 orphan debits, 1 credit

    # A dry run shows the reversal and writes nothing.
    dry = await _reverse(world, workflow_id, requested_by="alice", dry_run=True)
    shown = await dry.result()
    assert shown.outcome is Phase.DRY_RUN_COMPLETE and shown.plan is not None
    assert shown.plan.counts_by_kind["reverse_ledger_entry"] == 7
    assert await _balances(world) != balances and all(
        p["reversals"] == 0 for p in await _posted_by(world, workflow_id)
    )

    handle = await _reverse(world, workflow_id, requested_by="alice")
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert view.plan is not None and view.plan.reverses_run_id is not None
    assert view.plan.counts_by_kind == {
        "reverse_ledger_entry": 7,
        "restore_row": 3 + 2 + 1 + 1,  # opened, closed orphans, credited and linked sessions
        "not_reversible": 1,  # the worker restart
    }
    assert view.plan.credit_total_minor == -sum(p["amount_minor"] for p in posted if p["amount_minor"] < 0)
    # Predicted balances: each org's balance now plus the reversal's money is the balance before the run.
    orgs, users = await operations.customer_balances(world.settings, view.plan.plan_id, limit=1000)
    predicted = {c["org_id"]: c["balance_after"] for c in orgs}
    # ... and each user's balance, where the ledger projection is per user.
    per_user = await _user_balances(world)
    assert users and all(u["balance_after"] == user_balances[(u["org_id"], u["user_id"])] for u in users)
    assert any(
        u["balance_before"] == per_user[(u["org_id"], u["user_id"])] != u["balance_after"] for u in users
    )
    assert predicted and all(predicted[org] == balances[org] for org in predicted), (predicted, balances)
    # The approval page says what the plan reverses and shows each customer's balance now and after.
    settings = world.settings.model_copy(update={"approvals_token": SecretStr("page-token")})
    app = approvals_app(settings, world.client, world.db)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://page") as page:
        html = (await page.get(f"/runs/{handle.id}", headers={"Authorization": "Bearer page-token"})).text
    assert (
        f"run <code>{view.plan.reverses_run_id}</code>: every entry it posted gets its exact inverse" in html
    )
    assert (
        "<th>Balance now</th><th>Balance after</th>" in html
        and "Users (the ledger projection is per user)" in html
    )
    # Nothing changes before approval; the requester may not approve a reversal.
    assert all(p["reversals"] == 0 for p in await _posted_by(world, workflow_id))
    await refused(
        handle, decision(view, "alice"), "self-approval: the requester cannot approve their own reversal"
    )
    assert view.approvals_needed == 2
    await approve(handle, decision(view, "bob"), "approve-bob")
    await approve(handle, decision(view, "carol"), "approve-carol")
    result = await handle.result()
    assert result.outcome is Phase.COMPLETED, result
    assert result.verification is not None and result.verification.passed, result.verification
    await keep_history(handle, "reversal_full")

    # Independent SQL: every balance and every row as before the original run; originals kept, each
    # linked to exactly one exact inverse.
    assert await _balances(world) == balances
    assert await _rows(world) == rows
    after = await _posted_by(world, workflow_id)
    assert len(after) == 7
    assert all(
        p["reversals"] == 1 and p["inverse"] == -p["amount_minor"] and p["reversed_by_entry_id"]
        for p in after
    )
    # The runbook's checks see the drift again, as before the original run.
    assert result.applied is not None and result.applied.applied == 14

    # The evidence names the original; the original's status says who reversed it; the chain verifies.
    document = await operations.evidence(world.settings, handle.id)
    assert document["reversal"]["workflow_id"] == workflow_id
    assert all(b["explained"] == "as predicted" for b in document["balances"])
    assert "## Reverses" in render_evidence_markdown(document)
    assert await verify_evidence(world, handle.id) == []
    words = operations.reversed_by_words(await operations.reversals_of(world.settings, workflow_id))
    completed = [w for w in words if "in full: completed" in w]
    assert len(completed) == 1 and handle.id in completed[0], words
    original = render_evidence_markdown(
        await operations.evidence(world.settings, workflow_id, reversals=True)
    )
    assert (
        f"**Reversed by** {handle.id} (completed), requested by alice: plan priced usage wrongly" in original
    )

    # A second reversal of the same run changes nothing (its plan holds only the note on the restart).
    ledger = await world.db.fetchval("SELECT count(*) FROM billing.ledger_entries")
    again = await _reverse(world, workflow_id, requested_by="bob")
    second = await again.result()
    assert second.outcome is Phase.COMPLETED, second
    assert second.plan is not None and second.plan.counts_by_kind == {"not_reversible": 1}
    # It reversed nothing, so the original still names one reversal.
    assert len(operations.reversed_by_words(await operations.reversals_of(world.settings, workflow_id))) == 1
    assert await world.db.fetchval("SELECT count(*) FROM billing.ledger_entries") == ledger
    assert await _rows(world) == rows
    # A reversal is not reversed; an id nothing ran under has nothing to reverse.
    with pytest.raises(operations.OperationError, match="is itself a reversal"):
        await _reverse(world, handle.id)
    with pytest.raises(
        operations.OperationError, match="nothing to reverse: no remediation 'remediation-org:nobody'"
    ):
        await _reverse(world, "remediation-org:nobody")


async def test_scoped_reversal_touches_only_its_scope_and_names_changed_rows(world: World) -> None:
    workflow_id, balances, _, _ = await _remediated(world, "rs")
    # The platform changes one row the run created after the run: that row is a follow-up, untouched.
    changed, org = await world.db.fetchrow(
        "SELECT id, org_id FROM billing.usage_records WHERE created_by LIKE 'remediation:%' ORDER BY id LIMIT 1"
    )
    assert len({o for o in balances}) >= 2
    await world.db.execute("UPDATE billing.usage_records SET last_billed_at = now() WHERE id = $1", changed)
    rows_before = await _rows(world)
    others = {o: b for o, b in (await _balances(world)).items() if o != org}

    handle = await _reverse(world, workflow_id, requested_by="ic-dana", org_id=org)
    view: StatusView = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert view.plan is not None
    planned_orgs = {
        r["org_id"]
        for r in await world.db.fetch(
            "SELECT DISTINCT org_id FROM remediation.plan_actions WHERE plan_id = $1", view.plan.plan_id
        )
    }
    assert planned_orgs == {org}
    await approve_quorum(handle, view)
    failed = await wait_phase(handle, {Phase.AWAITING_DECISION})
    assert failed.verification is not None and not failed.verification.passed
    assert f"usage_record {changed} (follow_up)" in failed.verification.criteria[0].detail
    await handle.execute_update(
        names.UPDATE_DECIDE,
        VerdictDecision(choice="hand_off", actor="alice", comment="row changed meanwhile"),
    )
    result = await handle.result()
    assert result.outcome is Phase.HANDED_OFF

    # The org's money is back; every other org's balance and every row outside the org is byte-identical.
    now = await _balances(world)
    assert now[org] == balances[org]
    assert {o: b for o, b in now.items() if o != org} == others
    rows_now = await _rows(world)
    org_rows = {key for key, doc in rows_before.items() if json.loads(doc).get("org_id") == org}
    assert {k: v for k, v in rows_now.items() if k not in org_rows} == {
        k: v for k, v in rows_before.items() if k not in org_rows
    }
    # The changed row is exactly as the platform left it, and audited as a follow-up with the reason.
    assert rows_now[f"usage:{changed}"] == rows_before[f"usage:{changed}"]
    audit = await world.db.fetchrow(
        """SELECT outcome, after->>'follow_up' AS why FROM remediation.applied_actions
           WHERE plan_id = $1 AND kind = 'restore_row' AND outcome = 'follow_up'""",
        view.plan.plan_id,
    )
    assert audit["why"] == f"usage_record {changed}: changed since the remediation; not reverted"
    words = operations.reversed_by_words(await operations.reversals_of(world.settings, workflow_id))
    assert f"in part (org id {org})" in words[0]


async def _refunded_after_credit(world: World, prefix: str, *, partly: bool = False) -> Record:
    """A remediated run whose credit the customer's bank then refunds at the provider (in full, or half)."""
    await _remediated(world, prefix)
    credit = await world.db.fetchrow(
        """SELECT l.id, l.org_id, l.amount_minor, p.provider_ref FROM billing.ledger_entries l
           JOIN billing.payment_sessions p ON p.id = l.payment_session_id
           WHERE l.kind = 'payment_credit' AND l.actor LIKE 'remediation:%'"""
    )
    async with seeder_for(world.settings) as provider:
        if partly:
            await provider.refund(credit["provider_ref"], credit["amount_minor"] // 2)
        else:
            await provider.refund(credit["provider_ref"])
    return credit


async def test_credit_refunded_at_the_provider_after_the_run_is_found_and_reversed(world: World) -> None:
    credit = await _refunded_after_credit(world, "rp")
    balance = (await _balances(world))[credit["org_id"]]

    handle = await start(
        world,
        RemediationRequest(
            correlation_id="refund-after-credit", trigger=Trigger.RECONCILE_FAILED, requested_by="ic-dana"
        ),
    )
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert view.plan is not None and view.drift.get(CREDIT_REVOKED) == 1, view.drift
    action = await world.db.fetchrow(
        "SELECT entity_id, amount_minor, params FROM remediation.plan_actions WHERE plan_id = $1 AND kind = $2",
        view.plan.plan_id,
        "reverse_ledger_entry",
    )
    assert action["entity_id"] == str(credit["id"]) and action["amount_minor"] == -credit["amount_minor"]
    assert "refunded at the provider" in json.loads(action["params"])["provider"]["reason"]
    # Nothing moves before approval.
    assert (await _balances(world))[credit["org_id"]] == balance
    await approve_quorum(handle, view)
    result = await handle.result()
    assert result.outcome is Phase.COMPLETED, result
    reversal = await world.db.fetchrow(
        "SELECT amount_minor, actor FROM billing.ledger_entries WHERE reverses_entry_id = $1", credit["id"]
    )
    assert reversal["amount_minor"] == -credit["amount_minor"] and reversal["actor"] == "remediation:ic-dana"
    await keep_history(handle, "revoked_credit_reversed")
    assert (await _balances(world))[credit["org_id"]] == balance - credit["amount_minor"]


def test_reverse_refuses_malformed_input_by_name() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["reverse", "not-a-remediation", "--reason", "wrong rate", "--as", "dana"])
    assert result.exit_code == 2 and "malformed remediation id 'not-a-remediation'" in result.output, (
        result.output
    )
    result = runner.invoke(app, ["reverse", "remediation-global", "--as", "dana"])
    assert result.exit_code == 2 and "--reason" in result.output, result.output
    result = runner.invoke(
        app, ["reverse", "remediation-global", "--reason", "wrong rate", "--as", "dana", "--org", "bad id!"]
    )
    assert result.exit_code == 2 and "org_id" in result.output, result.output


async def test_a_partly_refunded_credit_goes_to_a_human_not_reversed_in_full(world: World) -> None:
    credit = await _refunded_after_credit(world, "rq", partly=True)
    ledger = await world.db.fetchval("SELECT count(*) FROM billing.ledger_entries")
    handle = await start(
        world,
        RemediationRequest(
            correlation_id="partial-refund", trigger=Trigger.RECONCILE_FAILED, requested_by="ic-dana"
        ),
    )
    result = await handle.result()
    # The exact inverse would take back the half the customer still paid: planned as a follow-up only.
    assert result.plan is not None and result.plan.counts_by_kind.get("reverse_ledger_entry") is None
    action = await world.db.fetchrow(
        "SELECT kind, amount_minor, params FROM remediation.plan_actions WHERE plan_id = $1 AND entity_id = $2",
        result.plan.plan_id,
        str(credit["id"]),
    )
    assert action["kind"] == "investigate_payment" and action["amount_minor"] == 0
    assert "partially refunded" in json.loads(action["params"])["provider"]["reason"]
    assert await world.db.fetchval("SELECT count(*) FROM billing.ledger_entries") == ledger
