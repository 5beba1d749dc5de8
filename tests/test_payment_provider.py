"""Provider-confirmed payment remediation, on the real provider server (localstripe) through Stripe's SDK.

Each row of the table in docs/operations.md ("Payments") has a test here: no credit without a captured
provider payment of the same amount and currency; never captured is marked failed; refunded, partly
refunded, different amounts and unknown ids are investigated and never applied; a refund between
approval and apply pays nothing and is audited; the provider down means no credit and a visible wait.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import stripe
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.testing import WorkflowEnvironment

import remediation_client as operations
from activities.payment_provider import StripePaymentProvider, judge
from config import Settings
from contracts import names
from contracts.models import (
    ConsumerSample,
    PaymentVerdict,
    Phase,
    ProviderPayment,
    StatusView,
    VerdictDecision,
)
from devstack.processes import free_port
from devstack.stack import PaymentProvider
from local_platform.events import publish
from local_platform.provider_payments import ProviderOutcome, seeder_for
from starters.render import render_status
from tests.conftest import World, make_world
from tests.helpers import (
    ConsumerSampler,
    decision,
    eventually,
    incident_in,
    ledger_state,
    request_for,
    start,
    wait_phase,
)
from workflows.criteria import worker_criterion

pytestmark = pytest.mark.asyncio(loop_scope="session")


def provider_client(settings: Settings) -> StripePaymentProvider:
    return StripePaymentProvider(
        settings.resolved_payment_provider_url(),
        settings.payment_provider_api_key.get_secret_value(),
        retries=0,
    )


async def test_verdict_rules_follow_the_table() -> None:
    def pay(**fields: Any) -> ProviderPayment:
        base: dict[str, Any] = {"ref": "pi_1", "found": True, "status": "succeeded", "amount_minor": 500,
                                "captured_minor": 500, "currency": "usd"}  # fmt: skip
        return ProviderPayment(**(base | fields))

    assert judge(500, "USD", pay())[0] is PaymentVerdict.CAPTURED
    for status in ("requires_payment_method", "requires_confirmation", "requires_action", "canceled"):
        assert judge(500, "USD", pay(status=status, captured_minor=0))[0] is PaymentVerdict.NOT_CAPTURED
    investigate = {
        "refunded": pay(refunded_minor=500),
        "partly refunded": pay(refunded_minor=1),
        "disputed": pay(disputed=True),
        "amount": pay(captured_minor=499, amount_minor=499),
        "currency": pay(currency="eur"),
        "unknown": ProviderPayment(ref="pi_x", found=False),
        "processing": pay(status="processing"),
    }
    for why, payment in investigate.items():
        verdict, reason = judge(500, "USD", payment)
        assert verdict is PaymentVerdict.INVESTIGATE, (why, reason)


async def test_the_sdk_reads_each_outcome_from_the_real_provider(world: World) -> None:
    provider = provider_client(world.settings)
    try:
        async with seeder_for(world.settings) as seeder:
            refs = await seeder.create_many(
                [
                    (ProviderOutcome.CAPTURED, "s-cap", 12_345, "usd", 0),
                    (ProviderOutcome.UNPAID, "s-unpaid", 12_345, "usd", 0),
                    (ProviderOutcome.UNPAID, "s-canceled", 12_345, "usd", 1),
                    (ProviderOutcome.REFUNDED, "s-refund", 12_345, "usd", 0),
                    (ProviderOutcome.REFUNDED, "s-partial", 12_345, "usd", 1),
                    (ProviderOutcome.AMOUNT_MISMATCH, "s-amount", 12_345, "usd", 0),
                ]
            )
        looked_up = [await provider.payment(ref) for ref in [*refs, "pi_doesnotexist"]]
        verdicts = [judge(12_345, "USD", p)[0] for p in looked_up]
        assert verdicts == [
            PaymentVerdict.CAPTURED,
            PaymentVerdict.NOT_CAPTURED,
            PaymentVerdict.NOT_CAPTURED,
            PaymentVerdict.INVESTIGATE,
            PaymentVerdict.INVESTIGATE,
            PaymentVerdict.INVESTIGATE,
            PaymentVerdict.INVESTIGATE,
        ]
        assert looked_up[2].status == "canceled"
        assert (looked_up[3].refunded_minor, looked_up[4].refunded_minor) == (12_345, 12_345 // 2)
        assert looked_up[5].captured_minor == 12_345 - 1_000
        assert not looked_up[6].found
        # A placeholder or empty ref is investigated, never waited on as if the provider were down.
        for bad in ("", "cs_t-pay-0000001", "pi_../../v1/charges"):
            assert not (await provider.payment(bad)).found, bad
        # The success events of the captured payments, from the provider's events API.
        events = await provider.succeeded_events(set(refs))
        assert refs[0] in events and refs[1] not in events and refs[2] not in events
    finally:
        await provider.aclose()


async def _actions(world: World, plan_id: str) -> dict[str, tuple[str, dict[str, Any]]]:
    rows = await world.db.fetch(
        "SELECT entity_id, kind, params FROM remediation.plan_actions WHERE plan_id = $1 AND entity_type = 'payment_session'",
        plan_id,
    )
    return {r["entity_id"]: (r["kind"], json.loads(r["params"])) for r in rows}


async def _session(world: World, pay: str) -> Any:
    return await world.db.fetchrow(
        """SELECT p.status, p.ledger_entry_id,
                  (SELECT count(*) FROM billing.ledger_entries l WHERE l.payment_session_id = p.id) AS credits
           FROM billing.payment_sessions p WHERE p.id = $1""",
        pay,
    )


async def test_the_plan_follows_the_provider_and_only_captured_payments_are_credited(world: World) -> None:
    incident = await incident_in(world, "payments-reconcile", "pp")
    injected = incident.injected
    handle = await start(world, request_for(incident, requested_by="ic-dana"))
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert view.plan is not None
    actions = await _actions(world, view.plan.plan_id)
    kinds = {pay: kind for pay, (kind, _) in actions.items()}
    lost_credit = set(injected["payment_drift"][0::2])
    for pay in injected["payment_drift"]:
        assert kinds[pay] == ("credit_payment" if pay in lost_credit else "link_payment_credit")
    assert [kinds[p] for p in injected["payment_unpaid"]] == ["mark_payment_failed"]
    for pay in injected["payment_refunded"] + injected["payment_amount_mismatch"]:
        assert kinds[pay] == "investigate_payment"
    # The provider's own figures and the webhook's fate are in the plan row (and its hash).
    refunded = actions[injected["payment_refunded"][0]][1]["provider"]
    assert refunded["verdict"] == "investigate" and "refunded" in refunded["reason"]
    assert refunded["payment"]["refunded_minor"] > 0
    webhooks = {pay: params["provider"]["webhook"] for pay, (_, params) in actions.items()}
    assert {webhooks[p].split(" (")[0] for p in lost_credit} == {"received, not applied", "never received"}
    mismatch = actions[injected["payment_amount_mismatch"][0]][1]["provider"]
    assert "amount differs" in mismatch["reason"]
    # Credits only for the captured payments that lost theirs: the plan's money is exactly those.
    amounts = {r["id"]: r["amount_minor"] for r in await world.db.fetch(
        "SELECT id, amount_minor FROM billing.payment_sessions WHERE id = ANY($1::text[])", list(lost_credit))}  # fmt: skip
    assert view.plan.credit_total_minor == sum(amounts.values())

    for who in ("alice", "bob"):
        await handle.execute_update(names.UPDATE_APPROVE, decision(view, who))
    result = await handle.result()
    assert result.outcome is Phase.COMPLETED, result
    assert result.applied is not None and result.applied.follow_ups == 2
    for pay in lost_credit:
        assert (await _session(world, pay))["credits"] == 1
    unpaid = await _session(world, injected["payment_unpaid"][0])
    assert (unpaid["status"], unpaid["credits"]) == ("failed", 0)
    for pay in injected["payment_refunded"] + injected["payment_amount_mismatch"]:
        row = await _session(world, pay)
        assert (row["status"], row["credits"]) == ("failed_reconcile", 0)
    outcomes = {
        r["kind"]: r["outcome"]
        for r in await world.db.fetch(
            "SELECT kind, outcome FROM remediation.applied_actions WHERE plan_id = $1", view.plan.plan_id
        )
    }
    assert outcomes["investigate_payment"] == "follow_up" and outcomes["credit_payment"] == "applied"
    assert result.verification is not None
    drift_left = next(c for c in result.verification.criteria if c.name == "no_unresolved_drift")
    assert drift_left.passed and "2 payment sessions handed to the payments team" in drift_left.detail


async def test_a_refund_between_approval_and_apply_pays_nothing_and_is_audited(world: World) -> None:
    incident = await incident_in(world, "payments-reconcile", "rf")
    handle = await start(world, request_for(incident, requested_by="ic-dana"))
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert view.plan is not None
    credited = sorted(
        p for p, (k, _) in (await _actions(world, view.plan.plan_id)).items() if k == "credit_payment"
    )
    victim = credited[0]
    ref = await world.db.fetchval("SELECT provider_ref FROM billing.payment_sessions WHERE id = $1", victim)
    client = stripe.StripeClient(
        "sk_test_x", base_addresses={"api": world.settings.resolved_payment_provider_url()}
    )
    client.v1.refunds.create(params={"payment_intent": ref})  # the customer got their money back
    ledger_before = await ledger_state(world)
    for who in ("alice", "bob"):
        await handle.execute_update(names.UPDATE_APPROVE, decision(view, who))
    # The refunded credit is skipped, so its drift remains: verification fails and asks a human.
    view = await wait_phase(handle, {Phase.AWAITING_DECISION})
    assert (await _session(world, victim))["credits"] == 0
    audit = await world.db.fetchrow(
        """SELECT a.outcome, a.after FROM remediation.applied_actions a JOIN remediation.plan_actions p
           USING (plan_id, seq) WHERE a.plan_id = $1 AND p.entity_id = $2""",
        view.plan.plan_id if view.plan else "",
        victim,
    )
    assert audit["outcome"] == "skipped_provider"
    assert "refunded" in json.loads(audit["after"])["skipped"]
    posted = await world.db.fetchval(
        "SELECT coalesce(sum(amount_minor), 0) FROM billing.ledger_entries WHERE payment_session_id = $1",
        victim,
    )
    assert posted == 0
    assert len(await ledger_state(world)) == len(ledger_before) + len(credited) - 1
    await handle.execute_update(
        names.UPDATE_DECIDE,
        VerdictDecision(actor="alice", choice="hand_off", comment="refunded: payments team"),
    )
    assert (await handle.result()).outcome is Phase.HANDED_OFF
    # What people read agrees: the summaries count only the credits really posted, not the skipped one.
    credited = await world.db.fetchval(
        "SELECT sum(amount_minor) FROM billing.ledger_entries WHERE actor LIKE 'remediation:%' AND amount_minor > 0"
    )
    doc = await operations.evidence(world.settings, handle.id)
    assert f"Payments totalling {credited / 100:,.2f} USD" in doc["customer_summary"]
    assert sum(c["credits_minor"] for c in doc["customer_summaries"]) == credited
    skipped = next(p for p in doc["payments"] if p["session_id"] == victim)
    assert skipped["outcome"] == "skipped_provider"


@pytest_asyncio.fixture(loop_scope="session")
async def own_provider(state_root: Path) -> AsyncIterator[PaymentProvider]:
    # Not the session's exported provider: this test stops and restarts its own.
    settings = Settings(
        REMEDIATION_STATE_DIR=state_root / f"provider-{free_port()}",
        PAYMENT_PROVIDER_PORT=free_port(),
        PAYMENT_PROVIDER_URL="",
    )
    server = PaymentProvider(settings)
    assert not server.external
    server.start()
    yield server
    server.stop()


async def test_provider_down_means_no_credit_and_a_visible_wait(
    pg_settings: Settings,
    template_db: str,
    state_root: Path,
    temporal_env: WorkflowEnvironment,
    own_provider: PaymentProvider,
) -> None:
    overrides: dict[str, Any] = {
        "PAYMENT_PROVIDER_URL": own_provider.address,
        "PAYMENT_PROVIDER_WAIT_SECONDS": 1,
        "PAYMENT_PROVIDER_RETRIES": 0,
    }
    async for world in make_world(pg_settings, template_db, state_root, temporal_env.client, **overrides):
        incident = await incident_in(world, "payments-reconcile", "pd")
        own_provider.stop()
        ledger_before = await ledger_state(world)
        handle = await start(world, request_for(incident, requested_by="ic-dana"))
        view = await wait_phase(handle, {Phase.WAITING_ON_PROVIDER})
        assert view.plan is None
        # The UI's details say what it waits for and that nothing is credited meanwhile.
        metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
        assert "Waiting on the payment provider" in metadata.current_details
        assert "7 payment sessions unconfirmed" in metadata.current_details
        # ... and so does `remediate status`.
        status = await handle.query(names.QUERY_STATUS, result_type=StatusView)
        assert status.waiting_on_provider and "7 payment sessions unconfirmed" in status.waiting_on_provider
        assert "WAITING on the payment provider" in render_status(handle.id, status)
        # It keeps asking, and still nothing is planned or credited.
        await asyncio.sleep(3)
        assert (await handle.query(names.QUERY_STATUS, result_type=StatusView)).plan is None
        assert await ledger_state(world) == ledger_before
        # The provider comes back with every payment it had (its store is kept): the run plans.
        own_provider.start()
        view = await wait_phase(handle, {Phase.AWAITING_APPROVAL}, timeout=60)
        assert view.plan is not None and view.plan.counts_by_kind.get("credit_payment") == 2
        await handle.terminate("test done")


async def test_a_stalled_consumer_fails_the_worker_criterion(world: World) -> None:
    sampler = ConsumerSampler(world)
    sample = sampler.sample
    try:
        await world.db.execute("UPDATE billing.worker_control SET mode = 'crashed'")
        threshold = world.settings.consumer_pending_threshold
        for i in range(threshold * 2):
            await publish(world.nc, "provisioning.active", "stall", "", allocation_id=f"none-{i}")
        await world.nc.flush()

        async def stalled_window() -> tuple[ConsumerSample, ConsumerSample] | None:
            # A verification window over which the crashed worker acked nothing (it may finish the
            # batch it held when the mode changed).
            start = await sample()
            await asyncio.sleep(1)
            end = await sample()
            return (start, end) if end.ack_floor == start.ack_floor and end.pending > threshold else None

        first, second = await eventually(stalled_window, timeout=30, what="the crashed worker to stop acking")
        stalled = worker_criterion(first, second, threshold)
        assert not stalled.passed and "no progress" in stalled.detail, stalled
        assert f"undelivered {first.pending} -> {second.pending}" in stalled.detail
        # Restarted, it works the backlog off: the ack floor advances and the criterion passes.
        await world.db.execute("UPDATE billing.worker_control SET mode = 'running'")

        async def recovered() -> bool:
            return worker_criterion(first, await sample(), threshold).passed

        await eventually(recovered, timeout=60, what="the restarted worker to make progress")
        assert not worker_criterion(None, second, threshold).passed  # unreachable is unknown, never a pass
    finally:
        await world.db.execute("UPDATE billing.worker_control SET mode = 'running'")
        await sampler.close()
