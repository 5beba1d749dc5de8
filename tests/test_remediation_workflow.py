"""The remediation workflow end to end on the real dev server, Postgres, NATS and the platform stand-in."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import jsonschema
import pytest
import pytest_asyncio
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.exceptions import CancelledError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

import remediation_client as operations
from config import Settings
from config.approver_keys import sign
from contracts import names
from contracts.models import (
    Phase,
    RemediationRequest,
    Scope,
    StatusView,
    Trigger,
    VerdictDecision,
)
from starters.incident_commands import start_checked
from starters.render import render_evidence_html
from tests.conftest import APPROVER_KEYS, World, make_world
from tests.helpers import (
    assert_ledger_is_the_plan,
    decision,
    drift,
    incident_in,
    ledger_state,
    refused,
    request_for,
    start,
    start_dispute,
    wait_phase,
)
from tests.histories import keep_history, replay_failure

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_worker_crash_remediated_exactly(world: World) -> None:
    incident = await incident_in(world, "worker-crash", "wc")
    before = await drift(world)
    assert {k: len(v) for k, v in before.items()} == {
        "missing_open": 3,
        "orphan_open": 2,
        "unbilled_closed": 4,
        "payment_drift": 3,  # 2 captured at the provider, 1 refunded there
    }
    ledger_before = await ledger_state(world)
    handle = await start(
        world,
        RemediationRequest(
            correlation_id=incident.correlation_id,
            trigger=Trigger.WORKER_FAILURE,
            trace_id=incident.trace_id,
            requested_by="ic-dana",
        ),
    )
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert view.blast_radius is not None and view.blast_radius.value == "widespread"
    assert view.frozen
    assert view.plan is not None
    # The plan lists exactly the injected drift (+ the worker restart the lagging consumer calls for).
    assert view.plan.counts_by_kind == {
        "open_usage_record": 3,
        "close_orphan_usage": 2,
        "post_usage_debit": 4,
        "credit_payment": 1,
        "link_payment_credit": 1,
        "investigate_payment": 1,
        "restart_billing_worker": 1,
    }
    planned = {
        r["entity_id"]
        for r in await world.db.fetch(
            "SELECT entity_id FROM remediation.plan_actions WHERE plan_id = $1 AND kind = 'open_usage_record'",
            view.plan.plan_id,
        )
    }
    assert planned == set(incident.injected["missing_open"])
    # Nothing changes before approval; manual adjustments are frozen.
    assert await ledger_state(world) == ledger_before
    assert (
        await world.db.fetchval("SELECT count(*) FROM billing.adjustment_freezes WHERE lifted_at IS NULL")
        == 1
    )
    # Refusals: unknown approver, self-approval, stale hash.
    await refused(handle, decision(view, "mallory"), "not an approver")
    await refused(handle, decision(view, "alice").model_copy(update={"plan_hash": "0" * 64}), "stale plan")
    # Anyone can claim a name: a decision signed with another approver's key, or unsigned, does not count.
    forged = sign(decision(view, "mallory").model_copy(update={"approver": "alice"}), APPROVER_KEYS["bob"])
    await refused(handle, forged, "bad signature")
    await refused(handle, decision(view, "alice").model_copy(update={"signature": None}), "unsigned")
    # Duplicate update ids run once; the second approver completes the quorum.
    for _ in range(2):
        await handle.execute_update(names.UPDATE_APPROVE, decision(view, "alice"), id="same-approval")
    assert (await handle.query(names.QUERY_STATUS, result_type=StatusView)).approvals == ["alice"]
    await refused(handle, decision(view, "alice"), "already approved")
    await handle.execute_update(names.UPDATE_APPROVE, decision(view, "bob"))
    result = await handle.result()
    assert result.outcome is Phase.COMPLETED, result
    assert result.verification is not None and result.verification.passed
    # The drift is gone by independent SQL; each action audited once; no key twice; money as planned.
    await assert_ledger_is_the_plan(world, view.plan)
    assert (
        await world.db.fetchval("SELECT count(*) FROM billing.adjustment_freezes WHERE lifted_at IS NULL")
        == 0
    )
    # Evidence exists and names the approvers.
    doc = await operations.evidence(world.settings, handle.id)
    assert {a["approver"] for a in doc["approvals"] if a["accepted"]} == {"alice", "bob"}
    # Before: the injected drift; after: what verification found (only the refunded payment, handed over).
    assert doc["query_evidence"]["before"]["drift"] == {
        "missing_open_usage": 3, "orphan_open_usage": 2, "payment_drift": 3, "unbilled_closed_usage": 4
    }  # fmt: skip
    assert doc["query_evidence"]["after"]["drift"] == {
        "missing_open_usage": 0, "orphan_open_usage": 0, "payment_drift": 1, "unbilled_closed_usage": 0
    }  # fmt: skip
    # The incident's timeline starts before the remediation (its failing lines, the drifted records)
    # and runs to recovery, each entry naming its source; the milestones' durations are fields.
    timeline = doc["incident_timeline"]
    started = next(i for i, e in enumerate(timeline) if e["event"].startswith("remediation started"))
    assert started > 0 and timeline[0]["source"] in ("loki", "billing data")
    assert {"loki", "billing data", "remediation", "approval", "verification", "admin API"} <= {
        e["source"] for e in timeline
    }
    events = [e["event"] for e in timeline]
    assert any(e.startswith("manual adjustments frozen") for e in events)
    assert any(e.startswith("freeze lifted") for e in events) and events[-1] == "outcome: completed"
    assert [e["at"] for e in timeline] == sorted(e["at"] for e in timeline)
    durations = doc["durations"]
    assert all(isinstance(v, int) and v >= 0 for v in durations.values()), durations
    # Each customer reads only its own corrections: the amounts are its own ledger's, by independent SQL.
    posted = {
        r["org_id"]: (int(r["credits"]), int(r["debits"]))
        for r in await world.db.fetch(
            """SELECT org_id, coalesce(sum(amount_minor) FILTER (WHERE amount_minor > 0), 0) AS credits,
                      coalesce(sum(amount_minor) FILTER (WHERE amount_minor < 0), 0) AS debits
               FROM billing.ledger_entries WHERE actor LIKE 'remediation:%' GROUP BY org_id"""
        )
    }
    summaries = {c["org_id"]: c for c in doc["customer_summaries"]}
    assert len(summaries) > 1 and set(posted) <= set(summaries)
    for org, summary in summaries.items():
        assert (summary["credits_minor"], summary["debits_minor"]) == posted.get(org, (0, 0)), org
        others = [o for o in summaries if o != org and posted.get(o, (0, 0))[0]]
        for other in others:  # another org's credit never appears in this org's text
            credit = posted[other][0]
            if credit and credit != summary["credits_minor"]:
                assert f"{credit / 100:,.2f}" not in summary["summary"]
    # The JSON form follows its published schema; the HTML form is one self-contained page with the chart.
    schema = json.loads((Path(__file__).parent.parent / "docs/schemas/evidence.schema.json").read_text())
    jsonschema.validate(doc, schema, format_checker=jsonschema.FormatChecker())
    page = render_evidence_html(doc)
    assert (
        page.startswith("<!doctype html>") and "<svg" in page and "src=" not in page and "href=" not in page
    )
    assert "missing_open_usage" in page and doc["run"]["correlation_id"] in page
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**doc, "plan": {**doc["plan"], "debit_total_minor": 5}}, schema)

    # Re-running the remediation on the repaired platform changes nothing.
    ledger_after = await ledger_state(world)
    again = await start(
        world,
        RemediationRequest(
            correlation_id=incident.correlation_id, requested_by="ic-dana", trigger=Trigger.WORKER_FAILURE
        ),
    )
    second = await again.result()
    assert second.outcome is Phase.COMPLETED
    # Only the refunded payment is left, as a follow-up: nothing to change, so nothing to approve.
    assert second.plan is not None and second.plan.empty
    assert second.plan.counts_by_kind == {"investigate_payment": 1}
    assert await ledger_state(world) == ledger_after
    await keep_history(handle, "approved_quorum")

    # The recorded history replays deterministically.
    history = await again.fetch_history()
    assert await replay_failure(history) is None


async def test_concurrent_approvals_are_audited_and_replay_deterministically(world: World) -> None:
    incident = await incident_in(world, "worker-crash", "ca")
    handle = await start(
        world,
        RemediationRequest(
            correlation_id=incident.correlation_id, trigger=Trigger.WORKER_FAILURE, requested_by="ic-dana"
        ),
    )
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    # Both approvers at once: the updates can land in one workflow task.
    await asyncio.gather(
        *(handle.execute_update(names.UPDATE_APPROVE, decision(view, who)) for who in ("alice", "bob"))
    )
    result = await handle.result()
    assert result.outcome is Phase.COMPLETED
    audited = await world.db.fetch(
        "SELECT approver FROM remediation.approvals WHERE run_id = $1 AND refusal_reason IS NULL ORDER BY approver",
        result.run_id,
    )
    assert [r["approver"] for r in audited] == ["alice", "bob"]
    history = await handle.fetch_history()
    assert await replay_failure(history) is None


async def test_rejection_changes_nothing_and_lifts_freeze(world: World) -> None:
    incident = await incident_in(world, "payments-reconcile", "pr")
    ledger_before = await ledger_state(world)
    handle = await start(
        world,
        RemediationRequest(
            correlation_id=incident.correlation_id, requested_by="ic-dana", trigger=Trigger.RECONCILE_FAILED
        ),
    )
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert (
        view.plan is not None
        and view.plan.counts_by_kind.get("credit_payment", 0)
        + view.plan.counts_by_kind.get("link_payment_credit", 0)
        == 4
    )
    # The signal path: a refused signal is audited, an accepted one decides.
    await handle.signal(names.SIGNAL_APPROVE, decision(view, "nobody"))
    await handle.signal(names.SIGNAL_APPROVE, decision(view, "carol", "reject"))
    result = await handle.result()
    assert result.outcome is Phase.REJECTED
    assert await ledger_state(world) == ledger_before
    assert (
        await world.db.fetchval("SELECT count(*) FROM billing.adjustment_freezes WHERE lifted_at IS NULL")
        == 0
    )
    refused = await world.db.fetch(
        "SELECT approver, refusal_reason FROM remediation.approvals WHERE NOT accepted"
    )
    assert [r["approver"] for r in refused] == ["nobody"]
    await keep_history(handle, "rejected")


async def test_user_dispute_self_approval_and_dry_run(world: World) -> None:
    incident = await incident_in(world, "user-dispute", "ud")
    scope = Scope(**incident.scope)
    dry = await start(
        world,
        RemediationRequest(
            correlation_id=incident.correlation_id,
            scope=scope,
            dry_run=True,
            requested_by="alice",
            trigger=Trigger.CUSTOMER_DISPUTE,
        ),
    )
    dry_result = await dry.result()
    assert dry_result.outcome is Phase.DRY_RUN_COMPLETE
    assert dry_result.plan is not None and dry_result.plan.counts_by_kind == {"close_orphan_usage": 1}
    assert dry_result.blast_radius is not None and dry_result.blast_radius.value == "single"
    await keep_history(dry, "dry_run")

    handle = await start(
        world,
        RemediationRequest(
            correlation_id=incident.correlation_id,
            scope=scope,
            requested_by="alice",
            trigger=Trigger.CUSTOMER_DISPUTE,
        ),
    )
    # Starting again for the same scope attaches to the running remediation.
    attached = await operations.start(
        world.client,
        world.settings,
        RemediationRequest(correlation_id=incident.correlation_id, scope=scope, requested_by="alice"),
    )
    assert attached.workflow_id == handle.id and attached.attached
    assert attached.run_id == handle.result_run_id
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    # Small single-user plan: one approver suffices, and the requester may approve it.
    assert view.approvals_needed == 1
    with pytest.raises(operations.OperationError, match="not an approver"):
        await operations.decide_plan(
            world.client,
            world.settings,
            handle.id,
            plan_hash=view.plan.plan_hash,  # type: ignore[union-attr]
            approver="eve",
            decision="approve",
            comment="",
        )
    assert (
        await world.db.fetchval(
            "SELECT count(*) FROM remediation.approvals WHERE approver = 'eve' AND NOT accepted"
        )
        == 1
    )
    await handle.execute_update(names.UPDATE_APPROVE, decision(view, "alice"))
    result = await handle.result()
    assert result.outcome is Phase.COMPLETED
    assert (await drift(world))["orphan_open"] == set()
    # An approval for a finished remediation is refused with a clear message.
    with pytest.raises(operations.OperationError, match=r"no plan is awaiting approval|completed"):
        await operations.decide_plan(
            world.client,
            world.settings,
            handle.id,
            plan_hash=view.plan.plan_hash,  # type: ignore[union-attr]
            approver="alice",
            decision="approve",
            comment="late",
        )


async def test_prepaid_depleted_recovers_launch_guard(world: World) -> None:
    incident = await incident_in(world, "prepaid-depleted", "pp")
    org = incident.scope["org_id"]
    handle = await start(
        world,
        RemediationRequest(
            correlation_id=incident.correlation_id,
            scope=Scope(org_id=org),
            requested_by="ic-dana",
            trigger=Trigger.PREPAID_DEPLETED,
        ),
    )
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert view.plan is not None
    assert view.plan.counts_by_kind == {"credit_payment": 1, "clear_financial_restriction": 1}
    assert (
        await world.db.fetchval("SELECT state FROM billing.financial_restrictions WHERE org_id = $1", org)
        == "restricted"
    )
    await handle.execute_update(names.UPDATE_APPROVE, decision(view, "bob"))
    result = await handle.result()
    assert result.outcome is Phase.COMPLETED
    assert result.verification is not None
    guard = next(c for c in result.verification.criteria if c.name == "launch_guard_recovered")
    assert guard.passed, guard.detail
    # The check ran as its own child workflow, linked to this run in the UI.
    child = await world.client.get_workflow_handle(f"{handle.id}-launch-guard-0").describe()
    assert child.workflow_type == "LaunchGuardVerification"
    assert child.parent_id == handle.id
    await keep_history(handle, "prepaid_launch_guard")
    assert (
        await world.db.fetchval("SELECT state FROM billing.financial_restrictions WHERE org_id = $1", org)
        == "none"
    )


async def test_nats_outage_during_diagnosis_is_a_finding(world: World) -> None:
    incident = await incident_in(world, "user-dispute", "no")
    world.nats_server.stop()
    handle = await start(world, request_for(incident, dry_run=True))
    result = await handle.result()
    assert result.outcome is Phase.DRY_RUN_COMPLETE
    view = await handle.query(names.QUERY_STATUS, result_type=StatusView)
    statuses = {c.check: c.status for c in view.diagnosis}
    assert statuses["nats_consumer"] == "unreachable"
    assert statuses["event_sequence"] == "unreachable"
    assert statuses["postgres"] == "ok"
    world.nats_server.start()  # same port and store: the platform reconnects


async def test_bad_scope_refused_before_start(world: World) -> None:
    incident = await incident_in(world, "user-dispute", "bs")
    alloc = incident.injected["orphan_open"][0]
    other_org = await world.db.fetchval(
        "SELECT id FROM billing.orgs WHERE id <> $1 ORDER BY id LIMIT 1", incident.scope["org_id"]
    )
    # `remediate start`'s own path, pointed at the tests' Temporal server: a start that slipped
    # through would really start.
    settings = world.settings.model_copy(
        update={"temporal_address": world.client.service_client.config.target_host}
    )
    refusals = [
        (Scope(project_id="bs-prj-0001-0", allocation_id=alloc), r"scope\.allocation_id: .* outside project"),
        (Scope(org_id="nope"), r"scope\.org_id: unknown org"),
        (Scope(user_id="bs-nobody"), r"scope\.user_id: unknown user"),
        (Scope(org_id=other_org, user_id=incident.scope["user_id"]), r"scope\.user_id: .* belongs to org"),
    ]
    for scope, message in refusals:
        request = request_for(incident, scope=scope)
        with pytest.raises(operations.OperationError, match=message):
            await start_checked(settings, request, wait=False)
        # Nothing was started: the server knows no workflow under the id this start would have used.
        with pytest.raises(RPCError) as missing:
            await world.client.get_workflow_handle(request.workflow_id()).describe()
        assert missing.value.status is RPCStatusCode.NOT_FOUND
    assert await world.db.fetchval("SELECT count(*) FROM remediation.runs") == 0
    with pytest.raises(operations.OperationError, match="malformed remediation id"):
        await operations.status(world.client, "not a workflow; drop table")


async def test_abort_lifts_the_freeze_and_changes_nothing(world: World) -> None:
    incident = await incident_in(world, "worker-crash", "ab")
    ledger_before = await ledger_state(world)
    handle = await start(
        world,
        RemediationRequest(
            correlation_id=incident.correlation_id, requested_by="ic-dana", trigger=Trigger.WORKER_FAILURE
        ),
    )
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert view.frozen
    assert (
        await world.db.fetchval("SELECT count(*) FROM billing.adjustment_freezes WHERE lifted_at IS NULL")
        == 1
    )
    await operations.abort(world.client, handle.id)
    with pytest.raises(WorkflowFailureError) as err:
        await handle.result()
    assert isinstance(err.value.cause, CancelledError)
    assert (
        await world.db.fetchval("SELECT count(*) FROM billing.adjustment_freezes WHERE lifted_at IS NULL")
        == 0
    )
    assert await ledger_state(world) == ledger_before
    assert (
        await world.db.fetchval(
            "SELECT outcome FROM remediation.runs WHERE run_id = $1", handle.result_run_id
        )
        == "cancelled"
    )


@pytest_asyncio.fixture(loop_scope="session")
async def slow_verify_world(
    pg_settings: Settings, template_db: str, state_root: Path, temporal_env: WorkflowEnvironment
) -> AsyncIterator[World]:
    """A world whose verification window is long enough for the test to move data inside it."""
    async for w in make_world(
        pg_settings, template_db, state_root, temporal_env.client, VERIFY_WINDOW_SECONDS=4
    ):
        yield w


async def test_failed_verification_waits_for_a_decision_then_retries(slow_verify_world: World) -> None:
    world = slow_verify_world
    incident, handle = await start_dispute(world, "vf")
    scope = Scope(**incident.scope)
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    first_hash = view.plan.plan_hash  # type: ignore[union-attr]
    await handle.execute_update(names.UPDATE_APPROVE, decision(view, "alice"))
    await wait_phase(handle, {Phase.VERIFYING}, timeout=30)
    # New drift appears in scope while verifying: an allocation released with its usage still open.
    moved = await world.db.fetchval(
        """UPDATE billing.allocations SET status = 'released' WHERE id = (
               SELECT a.id FROM billing.allocations a JOIN billing.usage_records u ON u.allocation_id = a.id
               WHERE a.requested_by_user_id = $1 AND a.status = 'active' AND u.end_time IS NULL
               ORDER BY a.id LIMIT 1) RETURNING id""",
        scope.user_id,
    )
    assert moved is not None
    view = await wait_phase(handle, {Phase.AWAITING_DECISION})
    assert view.verification is not None and not view.verification.passed
    failed = {c.name for c in view.verification.criteria if not c.passed}
    assert failed == {"no_unresolved_drift"}
    # Only approvers decide; the retry builds a new plan that needs a fresh approval.
    with pytest.raises(WorkflowUpdateFailedError):
        await handle.execute_update(
            names.UPDATE_DECIDE, VerdictDecision(actor="mallory", choice="retry", comment="")
        )
    await handle.execute_update(
        names.UPDATE_DECIDE, VerdictDecision(actor="bob", choice="retry", comment="new drift; retry")
    )
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert view.plan is not None and view.plan.plan_hash != first_hash
    assert view.plan.counts_by_kind == {"close_orphan_usage": 1}
    await refused(handle, decision(view, "alice").model_copy(update={"plan_hash": first_hash}), "stale plan")
    await handle.execute_update(names.UPDATE_APPROVE, decision(view, "alice"))
    result = await handle.result()
    assert result.outcome is Phase.COMPLETED
    assert moved not in (await drift(world))["orphan_open"]
    await keep_history(handle, "verification_failed_retry")
