"""The provider is asked about a scope's unreconciled payments while the run diagnoses (issue 29).

On the real provider (localstripe) and the real stack: every payment finding's verdict comes from an
answer asked while diagnosing, the timeline says so, and the pass reuses only answers still fresh,
judged again against the session as it is now.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import asyncpg
import httpx
import pytest
from temporalio.testing import ActivityEnvironment

from activities.loki import LokiActivities
from activities.payment_checks import ANSWER_FRESH_SECONDS, PaymentCheckActivities
from activities.payment_provider import StripePaymentProvider
from contracts.models import DriftKind, PaymentVerdict, Phase, ReconcileRequest, RunRef
from tests.conftest import World
from tests.helpers import incident_in, request_for, start, wait_phase

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_answers_asked_while_diagnosing_make_the_verdicts_and_only_fresh_ones_are_reused(
    world: World,
) -> None:
    incident = await incident_in(world, "payments-reconcile", "pf")
    request = request_for(incident, requested_by="ic-dana")
    handle = await start(world, request)
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert view.plan is not None
    run_id = (await handle.describe()).run_id
    findings = {
        r["entity_id"]: json.loads(r["provider"])
        for r in await world.db.fetch(
            """SELECT entity_id, detail->'provider' AS provider FROM remediation.findings
               WHERE run_id = $1 AND pass = 0 AND kind = $2""",
            run_id,
            DriftKind.PAYMENT_DRIFT.value,
        )
    }
    answers = {
        r["entity_id"]: json.loads(r["answer"])
        for r in await world.db.fetch(
            "SELECT entity_id, answer::text AS answer FROM remediation.provider_answers WHERE run_id = $1",
            run_id,
        )
    }
    # Every payment finding was answered while diagnosing, and its verdict is that answer's.
    assert len(findings) == 7 and set(findings) <= set(answers)
    for entity, provider in findings.items():
        assert provider["payment"] == answers[entity]["payment"]
        assert provider["verdict"] == answers[entity]["verdict"]
    said = await world.db.fetchval(
        "SELECT message FROM remediation.timeline WHERE run_id = $1 AND message LIKE 'payment provider checked%'",
        run_id,
    )
    assert "(7 answered while the run diagnosed)" in said

    # Run the pass's check again on the same findings: one answer made stale, one fresh but altered, one
    # fresh but about a payment the session no longer names.
    stale, fresh, moved = sorted(incident.injected["payment_drift"])[:3]
    altered = answers[fresh] | {
        "payment": answers[fresh]["payment"] | {"refunded_minor": answers[fresh]["payment"]["captured_minor"]}
    }
    await world.db.execute(
        "UPDATE remediation.provider_answers SET answer = $3::jsonb WHERE run_id = $1 AND entity_id = $2",
        run_id,
        fresh,
        json.dumps(altered),
    )
    await world.db.execute(
        """UPDATE remediation.provider_answers SET answer = $3::jsonb, asked_at = now() - make_interval(secs => $4)
           WHERE run_id = $1 AND entity_id = $2""",
        run_id,
        stale,
        json.dumps(altered | {"payment": answers[stale]["payment"] | {"disputed": True}}),
        float(ANSWER_FRESH_SECONDS + 1),
    )
    await world.db.execute(
        "UPDATE remediation.provider_answers SET answer = $3::jsonb WHERE run_id = $1 AND entity_id = $2",
        run_id,
        moved,
        json.dumps(altered | {"payment": altered["payment"] | {"ref": "pi_not_this_sessions"}}),
    )
    await world.db.execute(
        "UPDATE remediation.findings SET detail = detail - 'provider' WHERE run_id = $1 AND entity_id = ANY($2::text[])",
        run_id,
        [stale, fresh, moved],
    )
    s = world.settings
    provider = StripePaymentProvider(
        s.resolved_payment_provider_url(), s.payment_provider_api_key.get_secret_value(), retries=0
    )
    try:
        async with httpx.AsyncClient(base_url=s.resolved_loki_url()) as http:
            acts = PaymentCheckActivities(world.db, provider, LokiActivities(http, s.loki_tenant))
            ref = RunRef(
                run_id=run_id,
                workflow_id=handle.id,
                correlation_id=request.correlation_id,
                scope=request.scope,
            )
            await ActivityEnvironment().run(acts.check_payment_findings, ReconcileRequest(ref=ref, pass_no=0))
    finally:
        await provider.aclose()
    again = {
        r["entity_id"]: json.loads(r["provider"])
        for r in await world.db.fetch(
            "SELECT entity_id, detail->'provider' AS provider FROM remediation.findings WHERE run_id = $1 AND entity_id = ANY($2::text[])",
            run_id,
            [stale, fresh, moved],
        )
    }
    # The fresh answer was reused and judged again: what it says now is a full refund.
    assert again[fresh]["verdict"] == "investigate" and "fully refunded" in again[fresh]["reason"]
    # The stale one was asked again: the provider's own answer, not the stored dispute.
    assert again[stale]["payment"]["disputed"] is False
    assert again[stale]["verdict"] == findings[stale]["verdict"]
    # The one about another payment was asked again about the session's own.
    assert again[moved]["payment"] == findings[moved]["payment"]
    assert again[moved]["verdict"] == findings[moved]["verdict"]
    await handle.terminate("test done")


class CountingProvider(StripePaymentProvider):
    """The real SDK client, counting the pages of success events it is let read."""

    pages = 0

    async def succeeded_events(
        self, refs: set[str], wanted: Callable[[set[str]], Awaitable[bool]] | None = None
    ) -> dict[str, str]:
        async def counted(found: set[str]) -> bool:
            more = await wanted(found) if wanted is not None else True
            self.pages += more
            return more

        return await super().succeeded_events(refs, counted)


async def test_success_events_are_read_beside_the_lookups_and_only_for_payments_found_succeeded(
    world: World,
) -> None:
    s = world.settings
    provider = CountingProvider(
        s.resolved_payment_provider_url(), s.payment_provider_api_key.get_secret_value(), retries=0
    )
    sdk = provider.client.v1.payment_intents
    captured = [
        (await sdk.create_async(params={"amount": 1500, "currency": "usd", "payment_method": "pm_card_visa",
                                        "confirm": True})).id
        for _ in range(2)
    ]  # fmt: skip
    never = [(await sdk.create_async(params={"amount": 900, "currency": "usd"})).id for _ in range(2)]

    async def rows(refs: list[str], amount: int) -> list[asyncpg.Record]:
        found: list[asyncpg.Record] = await world.db.fetch(
            """SELECT 'session-' || r AS entity_id, r AS provider_ref, $2::bigint AS amount_minor, 'usd' AS currency
               FROM unnest($1::text[]) AS r""",
            refs,
            amount,
        )
        return found

    try:
        async with httpx.AsyncClient(base_url=s.resolved_loki_url()) as http:
            acts = PaymentCheckActivities(world.db, provider, LokiActivities(http, s.loki_tenant))
            # Nothing succeeded: no page of events is read (paging would look for events that cannot exist).
            unpaid = await acts._judge_all(await rows(never, 900), [0])
            assert provider.pages == 0
            assert {c.verdict for c in unpaid.values()} == {PaymentVerdict.NOT_CAPTURED}
            assert {c.webhook for c in unpaid.values()} == {"no success event at the provider"}
            # Succeeded ones get their event, found while the other lookups still run.
            mixed = await acts._judge_all(await rows(captured, 1500) + await rows(never, 900), [0])
    finally:
        await provider.aclose()
    assert provider.pages >= 1
    for ref in captured:
        check = mixed[f"session-{ref}"]
        assert check.verdict is PaymentVerdict.CAPTURED
        assert check.webhook.startswith("never received (provider event evt_"), check.webhook
    for ref in never:
        assert mixed[f"session-{ref}"].webhook == "no success event at the provider"
