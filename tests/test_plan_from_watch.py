"""A platform-wide plan built from the drift watch's state, and verification's full pass (issue 29).

The watch's last full pass plus the keys changed since, checked when the run plans, stand for a full
reconciliation while the watch keeps up; the plan says so and how old its state is. A record fixed
since the full pass is not planned; a hand edit no event named is the verification's full pass to find.
A watch that stopped ticking is not used, and the plan says why.
"""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
from pydantic import SecretStr

import remediation_client as operations
from approval_page.app import approvals_app
from contracts import names
from contracts.models import Phase, RemediationRequest, Scope, StatusView, Trigger, VerdictDecision
from contracts.watch import WatchConfig
from local_platform.events import publish_stored
from local_platform.provider_payments import seeder_for
from local_platform.seeder import SeedSpec, seed
from remediation_client import watch
from starters.render import render_evidence_markdown, render_status
from tests.conftest import World
from tests.helpers import (
    approve_quorum,
    drift,
    eventually,
    incident_in,
    request_for,
    start,
    verify_evidence,
    wait_phase,
)

# The watch records what it finds and starts nothing: the test starts the run.
RECORD_ONLY = {"every_seconds": 3600, "settle_seconds": 0, "act_threshold": 1_000_000}


async def _watch(world: World) -> None:
    """A platform-wide watch and its full pass."""
    config = WatchConfig.model_validate(RECORD_ONLY | {"watch_id": "platform"})
    await watch.enable(world.client, world.settings, config, "test", paused=True)
    full = await watch.run_now(world.client, "platform", full=True)
    assert full.mode == "full" and sum(full.findings.values()) > 0


async def _drifted(world: World, prefix: str) -> None:
    """A platform with drift of every kind, its payments real at the provider, its outbox relay healthy."""
    spec = SeedSpec(orgs=4, allocations=80, prefix=prefix, seed=12,
                    inject={"missing_open": 3, "orphan_open": 2, "unbilled_closed": 4, "payment_drift": 2})  # fmt: skip
    async with world.db.acquire() as conn, seeder_for(world.settings) as provider:
        await seed(conn, spec, world.nc, provider)


def _platform_wide(prefix: str) -> RemediationRequest:
    return RemediationRequest(
        correlation_id=f"{prefix}-corr", requested_by="ic-dana", trigger=Trigger.WORKER_FAILURE, scope=Scope()
    )


async def _release(world: World, prefix: str, *, event: bool) -> tuple[str, int]:
    """Release an allocation whose usage stays open (orphan drift), announced by an event or by hand;
    the allocation and its open usage record."""
    alloc, usage = await world.db.fetchrow(
        """UPDATE billing.allocations a SET status = 'released', released_at = now(), releasing_at = now()
           WHERE a.id = (SELECT a2.id FROM billing.allocations a2 JOIN billing.usage_records u
                         ON u.allocation_id = a2.id AND u.end_time IS NULL
                         WHERE a2.status = 'active' AND a2.id LIKE $1 ORDER BY a2.id DESC LIMIT 1)
           RETURNING a.id, (SELECT u.id FROM billing.usage_records u
                            WHERE u.allocation_id = a.id AND u.end_time IS NULL)""",
        f"{prefix}-alloc-%",
    )
    if event:
        await publish_stored(world.nc, "provisioning.releasing.completed", f"{prefix}-corr", "",
                             allocation_id=alloc, at=datetime.now(UTC).isoformat(), replayed=True)  # fmt: skip
        await world.nc.flush()
    return alloc, usage


async def _planned(world: World, run_id: str) -> dict[str, set[str]]:
    """The run's first pass findings, keyed as the independent drift SQL keys them."""
    rows = await world.db.fetch(
        """SELECT kind, CASE WHEN entity_type = 'payment_session' THEN entity_id ELSE allocation_id END AS key
           FROM remediation.findings WHERE run_id = $1 AND pass = 0""",
        run_id,
    )
    names = {"missing_open_usage": "missing_open", "orphan_open_usage": "orphan_open",
             "unbilled_closed_usage": "unbilled_closed", "payment_drift": "payment_drift"}  # fmt: skip
    found: dict[str, set[str]] = {k: set() for k in names.values()}
    for r in rows:
        if r["kind"] in names:
            found[names[r["kind"]]].add(r["key"])
    return found


async def test_a_platform_wide_plan_from_the_watch_is_exact_and_verification_reads_every_row(
    world: World,
) -> None:
    await _drifted(world, "pw")
    await _watch(world)
    watched = await drift(world)
    # Since the full pass: one of its findings is fixed by hand; an allocation is released with its
    # event before the watch's last tick (it stores the key), another one after it, seconds before the
    # run starts (the run brings the watch up to the stream's end); one is released with no event.
    fixed = sorted(watched["missing_open"])[0]
    await world.db.execute(
        "UPDATE billing.allocations SET status = 'released', released_at = now() WHERE id = $1", fixed
    )
    evented, _ = await _release(world, "pw", event=True)
    tick = await watch.run_now(world.client, "platform")
    assert tick.mode == "incremental" and tick.events_read >= 1
    late, _ = await _release(world, "pw", event=True)
    hand_edit, hand_edit_usage = await _release(world, "pw", event=False)
    now = await drift(world)
    assert fixed not in now["missing_open"] and {evented, late, hand_edit} <= now["orphan_open"]

    handle = await start(world, _platform_wide("pw"))
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL}, timeout=120)
    assert view.plan is not None
    source = view.plan.findings_from
    assert source.startswith("drift watch 'platform': its full pass") and "checked now" in source, source
    assert "findings from drift watch 'platform'" in render_status(handle.id, view)
    # The approvers' page says it too, beside the hash they sign.
    settings = world.settings.model_copy(update={"approvals_token": SecretStr("page-token")})
    app = approvals_app(settings, world.client, world.db)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://page") as page:
        html = (await page.get(f"/runs/{handle.id}", headers={"Authorization": "Bearer page-token"})).text
    assert (
        '<dt>Findings from</dt><dd class="findings-from">drift watch &#39;platform&#39;: its full pass'
        in html
    )
    run_id = await world.db.fetchval("SELECT run_id FROM remediation.runs WHERE workflow_id = $1", handle.id)
    # Exactly a full reconciliation's findings now, but the hand edit no event named.
    expected = now | {"orphan_open": now["orphan_open"] - {hand_edit}}
    assert await _planned(world, run_id) == expected
    recorded = await world.db.fetchrow(
        "SELECT source, watch_id, keys_checked FROM remediation.reconcile_sources WHERE run_id = $1 AND pass = 0",
        run_id,
    )
    assert (recorded["source"], recorded["watch_id"]) == ("watch", "platform") and recorded[
        "keys_checked"
    ] > 0

    # Verification reads every row: the hand edit is named as left, and the verdict fails on it.
    await approve_quorum(handle, view)

    async def verified() -> StatusView | None:
        status = await wait_phase(handle, {Phase.AWAITING_DECISION, Phase.COMPLETED}, timeout=180)
        return status if status.verification is not None else None

    verdict = await eventually(verified, timeout=180, what="the verification")
    assert verdict.verification is not None and not verdict.verification.passed
    [failed] = [c for c in verdict.verification.criteria if c.name == "no_unresolved_drift"]
    assert not failed.passed and str(hand_edit_usage) in {e.entity_id for e in failed.left}, failed
    verification_source = await world.db.fetchval(
        "SELECT source FROM remediation.reconcile_sources WHERE run_id = $1 AND pass = 100", run_id
    )
    assert verification_source == "full"
    # Handed off: the evidence pack names the plan's source too, and verifies.
    await handle.execute_update(
        names.UPDATE_DECIDE, VerdictDecision(actor="bob", choice="hand_off", comment="hand edit: ops owns it")
    )
    assert (await handle.result()).outcome is Phase.HANDED_OFF
    doc = await operations.evidence(world.settings, handle.id)
    assert doc["plan"]["findings_from"] == source
    assert f"Findings from {source}." in render_evidence_markdown(doc)
    assert await verify_evidence(world, handle.id) == []


async def test_a_watch_that_stopped_ticking_is_not_used_and_the_plan_says_why(world: World) -> None:
    await _drifted(world, "ps")
    await _watch(world)
    # Four hours without a tick: more than three intervals of one hour.
    await world.db.execute(
        """UPDATE remediation.watch_ticks SET started_at = started_at - interval '4 hours',
               finished_at = finished_at - interval '4 hours'"""
    )
    await world.db.execute(
        "UPDATE remediation.watch_state SET last_full_at = last_full_at - interval '4 hours'"
    )
    handle = await start(world, _platform_wide("ps"))
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL}, timeout=120)
    assert view.plan is not None
    assert view.plan.findings_from == (
        "a full reconciliation of all orgs (drift watch 'platform' has not ticked successfully for 3"
        " intervals of 3600 s)"
    )
    run_id = await world.db.fetchval("SELECT run_id FROM remediation.runs WHERE workflow_id = $1", handle.id)
    assert await _planned(world, run_id) == await drift(world)
    await handle.terminate("test done")


async def test_with_the_outbox_relay_behind_the_plan_reads_every_row(world: World) -> None:
    # The worker-crash incident leaves 120 outbox rows unpublished: changes the watch never saw.
    incident = await incident_in(world, "worker-crash", "ob")
    await _watch(world)
    handle = await start(world, request_for(incident))
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL}, timeout=120)
    assert view.plan is not None
    assert view.plan.findings_from.startswith(
        "a full reconciliation of all orgs (not from the drift watch: outbox relay critical: 120 unpublished"
    ), view.plan.findings_from
    run_id = await world.db.fetchval("SELECT run_id FROM remediation.runs WHERE workflow_id = $1", handle.id)
    assert await _planned(world, run_id) == await drift(world)
    await handle.terminate("test done")


async def test_with_nats_down_the_watch_cannot_catch_up_and_the_plan_reads_every_row(world: World) -> None:
    await _drifted(world, "nd")
    await _watch(world)
    world.nats_server.stop()
    try:
        handle = await start(world, _platform_wide("nd"))
        view = await wait_phase(handle, {Phase.AWAITING_APPROVAL}, timeout=120)
    finally:
        world.nats_server.start()  # same port and store
    assert view.plan is not None
    assert view.plan.findings_from.startswith(
        "a full reconciliation of all orgs (not from the drift watch: the drift watch could not read the"
        " stream up to now: NATS"
    ), view.plan.findings_from
    run_id = await world.db.fetchval("SELECT run_id FROM remediation.runs WHERE workflow_id = $1", handle.id)
    assert await _planned(world, run_id) == await drift(world)
    await handle.terminate("test done")
