"""A skipped action says why, and a failed criterion names what is left (issue 31).

While a plan waits for approval the platform itself fixes some of the planned records through its own
paths (its billing worker, its provider webhook) and recomputes one cost; one record is deleted. The
apply writes nothing on any of them, and its audit, its verdict and its evidence say exactly why.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from pydantic import SecretStr

import remediation_client as operations
from approval_page.app import approvals_app
from contracts import names
from contracts.models import Phase, StatusView, VerdictDecision
from local_platform.events import publish
from local_platform.payment_webhooks import ACTOR as WEBHOOK_WORKER
from local_platform.payment_webhooks import SUCCEEDED, signature_header
from starters.render import render_evidence_markdown, render_status
from tests.conftest import World
from tests.helpers import (
    approve_quorum,
    eventually,
    incident_in,
    request_for,
    start,
    verify_evidence,
    wait_phase,
)

BILLING_WORKER = "gpuaas-billing-worker"


async def _release_again(world: World, usage_id: int, corr: str) -> None:
    """The platform redelivers the allocation's release event (at its recorded release time)."""
    alloc = await world.db.fetchrow(
        """SELECT a.id, coalesce(a.released_at, a.releasing_at) AS at FROM billing.allocations a
           JOIN billing.usage_records u ON u.allocation_id = a.id WHERE u.id = $1""",
        usage_id,
    )
    await publish(world.nc, "provisioning.releasing.completed", corr, "", allocation_id=alloc["id"],
                  at=alloc["at"].isoformat())  # fmt: skip
    await world.nc.flush()


async def _provider_says_paid(world: World, session_id: str) -> httpx.Response:
    """The provider's signed `payment_intent.succeeded` webhook for the session, to the platform."""
    session = await world.db.fetchrow(
        "SELECT provider_ref, amount_minor FROM billing.payment_sessions WHERE id = $1", session_id
    )
    payload = json.dumps(
        {
            "type": SUCCEEDED,
            "data": {"object": {"id": session["provider_ref"], "amount": session["amount_minor"]}},
        }
    )
    secret = world.settings.billing_api_token.get_secret_value()
    async with httpx.AsyncClient(base_url=world.settings.resolved_billing_api_url()) as http:
        return await http.post(
            "/webhooks/payment-provider",
            content=payload,
            headers={"Stripe-Signature": signature_header(payload, secret, int(time.time()))},
        )


async def test_platform_fixes_while_awaiting_approval_are_audited_with_reasons(world: World) -> None:
    incident = await incident_in(world, "worker-crash", "sk")
    handle = await start(world, request_for(incident))
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert view.plan is not None
    plan_id = view.plan.plan_id
    planned: dict[str, list[Any]] = {}
    for row in await world.db.fetch(
        "SELECT seq, kind, entity_id, amount_minor FROM remediation.plan_actions WHERE plan_id = $1 ORDER BY seq",
        plan_id,
    ):
        planned.setdefault(row["kind"], []).append(row)
    debits, orphans = planned["post_usage_debit"], planned["close_orphan_usage"]
    credit, link = planned["credit_payment"][0], planned["link_payment_credit"][0]
    assert len(debits) == 4 and len(orphans) == 2

    # The platform's own worker comes back and handles redelivered releases: two planned debits, one orphan.
    await world.db.execute("UPDATE billing.worker_control SET mode = 'running', updated_at = now()")
    for action in (debits[0], debits[1], orphans[0]):
        await _release_again(world, int(action["entity_id"]), incident.correlation_id)
    # Its webhook worker receives the provider's success events: one lost credit, one lost link.
    for action in (credit, link):
        response = await _provider_says_paid(world, action["entity_id"])
        assert response.status_code == 200, response.text
    # A forged webhook changes nothing.
    async with httpx.AsyncClient(base_url=world.settings.resolved_billing_api_url()) as http:
        forged = await http.post(
            "/webhooks/payment-provider", content="{}", headers={"Stripe-Signature": "t=1,v1=00"}
        )
    assert forged.status_code == 400
    # Its rating job recomputes one unbilled record's cost; one planned record is deleted outright.
    stale_id = int(debits[2]["entity_id"])
    await world.db.execute(
        "UPDATE billing.usage_records SET accrued_cost_minor = accrued_cost_minor + 250 WHERE id = $1",
        stale_id,
    )
    gone_id = int(debits[3]["entity_id"])
    await world.db.execute("DELETE FROM billing.usage_records WHERE id = $1", gone_id)
    # Someone posted a debit on the second orphan while it was still open: the close must not debit again.
    open_orphan = int(orphans[1]["entity_id"])
    prior_debit = await world.db.fetchval(
        """INSERT INTO billing.ledger_entries (org_id, requested_by_user_id, kind, amount_minor, usage_record_id,
               idempotency_key, actor) SELECT org_id, requested_by_user_id, 'usage_debit', $2, id,
               'usage-debit:' || id, $3 FROM billing.usage_records WHERE id = $1 RETURNING id""",
        open_orphan,
        orphans[1]["amount_minor"],
        BILLING_WORKER,
    )

    async def platform_done() -> bool:
        n = await world.db.fetchval(
            "SELECT count(*) FROM billing.ledger_entries WHERE usage_record_id = ANY($1::bigint[]) AND actor = $2",
            [int(a["entity_id"]) for a in (debits[0], debits[1], orphans[0])],
            BILLING_WORKER,
        )
        return bool(n == 3)

    await eventually(platform_done, timeout=30)

    await approve_quorum(handle, view)
    view = await wait_phase(handle, {Phase.AWAITING_DECISION}, timeout=120)

    audit = {
        r["seq"]: (r["outcome"], json.loads(r["after"]))
        for r in await world.db.fetch(
            "SELECT seq, outcome, after FROM remediation.applied_actions WHERE plan_id = $1", plan_id
        )
    }
    ledger_ids = {
        r["usage_record_id"]: r["id"]
        for r in await world.db.fetch(
            "SELECT id, usage_record_id FROM billing.ledger_entries WHERE usage_record_id = ANY($1::bigint[])",
            [int(a["entity_id"]) for a in (*debits, *orphans)],
        )
    }
    # Already done by the platform: which entry, and who wrote it.
    for action in (debits[0], debits[1]):
        outcome, after = audit[action["seq"]]
        assert outcome == "already_applied"
        entry = ledger_ids[int(action["entity_id"])]
        assert f"already debited by {BILLING_WORKER}: ledger entry {entry}," in after["skipped"]
        assert after["satisfied_by"]["id"] == entry
    outcome, after = audit[orphans[0]["seq"]]
    assert outcome == "already_applied"
    assert after["skipped"].startswith("already closed at ")
    assert (
        f"debited by {BILLING_WORKER}: ledger entry {ledger_ids[int(orphans[0]['entity_id'])]}"
        in after["skipped"]
    )
    credit_entry = await world.db.fetchval(
        "SELECT ledger_entry_id FROM billing.payment_sessions WHERE id = $1", credit["entity_id"]
    )
    outcome, after = audit[credit["seq"]]
    assert outcome == "already_applied"
    assert after["skipped"].startswith(f"already credited by {WEBHOOK_WORKER}: ledger entry {credit_entry},")
    assert after["skipped"].endswith("the session is linked to it")
    link_entry = await world.db.fetchval(
        "SELECT ledger_entry_id FROM billing.payment_sessions WHERE id = $1", link["entity_id"]
    )
    outcome, after = audit[link["seq"]]
    assert (outcome, after["skipped"].split(" (")[0]) == (
        "already_applied",
        f"already linked to ledger entry {link_entry}",
    )
    # Changed since planning: old -> new, and nothing written at either amount.
    outcome, after = audit[debits[2]["seq"]]
    cost = -debits[2]["amount_minor"]
    assert outcome == "skipped_stale"
    assert after["changed"] == {"accrued_cost_minor": {"planned": cost, "now": cost + 250}}
    assert "accrued cost changed since planning: " in after["skipped"] and " -> " in after["skipped"]
    # Gone.
    outcome, after = audit[debits[3]["seq"]]
    assert (outcome, after["skipped"]) == ("skipped_gone", f"usage record {gone_id} no longer exists")
    # The close audits exactly what it wrote: the record closed, no second debit, and why.
    outcome, after = audit[orphans[1]["seq"]]
    assert outcome == "applied"
    assert after["usage_record"]["end_time"] is not None and after["debit"] is None
    assert after["debit_not_posted"] == f"already debited by {BILLING_WORKER}: ledger entry {prior_debit}"
    # The remediation wrote no ledger entry for any of them.
    touched_usage = [int(a["entity_id"]) for a in (*debits, *orphans)]
    assert not await world.db.fetchval(
        """SELECT count(*) FROM billing.ledger_entries WHERE actor LIKE 'remediation:%'
           AND (usage_record_id = ANY($1::bigint[]) OR payment_session_id = ANY($2::text[]))""",
        touched_usage,
        [credit["entity_id"], link["entity_id"]],
    )

    # The verdict names the one record left, tied to its plan action and skip reason.
    assert view.verification is not None
    failed = [c for c in view.verification.criteria if not c.passed]
    assert [c.name for c in failed] == ["no_unresolved_drift"]
    [left] = failed[0].left
    assert (left.kind, left.entity_id, left.plan_id, left.seq, left.outcome) == (
        "unbilled_closed_usage", str(stale_id), plan_id, debits[2]["seq"], "skipped_stale"
    )  # fmt: skip
    assert left.reason == audit[debits[2]["seq"]][1]["skipped"]
    assert f"usage_record {stale_id}" in failed[0].detail and "accrued cost changed" in failed[0].detail
    status = render_status(handle.id, await handle.query(names.QUERY_STATUS, result_type=StatusView))
    assert f"left: unbilled_closed_usage usage_record {stale_id}" in status
    assert f"action #{debits[2]['seq']} post_usage_debit skipped_stale: accrued cost changed" in status

    # The approval page shows the left record and each action's outcome with its reason.
    settings = world.settings.model_copy(update={"approvals_token": SecretStr("page-token")})
    app = approvals_app(settings, world.client, world.db)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://page") as page:
        html = (await page.get(f"/runs/{handle.id}", headers={"Authorization": "Bearer page-token"})).text
    assert f"left: unbilled_closed_usage usage_record {stale_id}" in html
    assert f"skipped gone: usage record {gone_id} no longer exists" in html
    assert f"already applied: already debited by {BILLING_WORKER}" in html

    await handle.execute_update(
        names.UPDATE_DECIDE, VerdictDecision(actor="bob", choice="hand_off", comment="rating job owns it")
    )
    result = await handle.result()
    assert result.outcome is Phase.HANDED_OFF
    assert result.applied is not None
    assert (result.applied.already_applied, result.applied.skipped_stale, result.applied.skipped_gone) == (
        5,
        1,
        1,
    )
    # The evidence lists every skip with its reason, and the left record under the failed criterion.
    doc = await operations.evidence(world.settings, handle.id)
    skipped = {s["seq"]: (s["outcome"], s["reason"]) for s in doc["skipped"]}
    assert skipped == {
        seq: (outcome, after["skipped"]) for seq, (outcome, after) in audit.items() if outcome.startswith(("already", "skipped"))
    }  # fmt: skip
    assert len(skipped) == 7  # 5 already done, 1 changed, 1 gone
    [criterion] = [c for c in doc["verification"]["criteria"] if not c["passed"]]
    assert [e["entity_id"] for e in criterion["left"]] == [str(stale_id)]
    markdown = render_evidence_markdown(doc)
    assert "## Actions not applied, and why" in markdown
    assert f"skipped_gone: usage record {gone_id} no longer exists" in markdown
    assert await verify_evidence(world, handle.id) == []
