"""The drift watch (issue 26) on the real servers: a Temporal Schedule, the platform's events on NATS,
the billing data in Postgres, remediations started or joined on the real dev server."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pytest
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

import remediation_client as operations
from contracts.models import AlertNotice, Phase, RemediationRequest, Scope, StatusView, Trigger
from contracts.watch import WatchConfig, WatchTickResult
from local_platform.events import publish_stored
from local_platform.seeder import SeedSpec, seed
from remediation_client import watch
from starters.render import render_watch_status
from tests.conftest import World
from tests.faults.harness import temporal_address, worker_env
from tests.helpers import eventually, listed_runs, wait_phase
from worker.watch_metrics import watch_families


async def _platform(world: World, prefix: str) -> None:
    """A small platform with no drift (its events are history: the watch starts after them)."""
    async with world.db.acquire() as conn:
        await seed(conn, SeedSpec(orgs=3, allocations=40, prefix=prefix, seed=26, publish_events_limit=0))


async def _enable(world: World, watch_id: str, **config: int) -> WatchConfig:
    """The watch, created paused (ticks are run by the test, except where the schedule itself is tested)."""
    cfg = WatchConfig.model_validate(
        {"every_seconds": 3600, "settle_seconds": 0, **config, "watch_id": watch_id}
    )
    await watch.enable(world.client, world.settings, cfg, "test", paused=True)
    return cfg


async def _orphan(world: World, prefix: str, *, event: bool) -> tuple[str, int]:
    """An allocation released while its usage stays open: the platform's API did its part, the worker
    (told by a replayed event it skips, as a worker that drops a message) never closed the usage."""
    row = await world.db.fetchrow(
        """UPDATE billing.allocations a SET status = 'released', released_at = now(), releasing_at = now()
           WHERE a.id = (SELECT a2.id FROM billing.allocations a2 JOIN billing.usage_records u
                         ON u.allocation_id = a2.id AND u.end_time IS NULL
                         WHERE a2.status = 'active' AND a2.id LIKE $1 ORDER BY a2.id LIMIT 1)
           RETURNING a.id, (SELECT u.id FROM billing.usage_records u WHERE u.allocation_id = a.id AND u.end_time IS NULL)""",
        f"{prefix}-alloc-%",
    )
    if event:
        await publish_stored(world.nc, "provisioning.releasing.completed", f"{prefix}-corr", "", allocation_id=row[0],
                      at=datetime.now(UTC).isoformat(), replayed=True)  # fmt: skip
        await world.nc.flush()
    return row[0], row[1]


async def _tick(world: World, watch_id: str, *, full: bool = False) -> WatchTickResult:
    return await watch.run_now(world.client, watch_id, full=full)


async def test_event_driven_drift_is_found_by_the_next_tick_and_a_remediation_waits(world: World) -> None:
    await _platform(world, "dw")
    await _enable(world, "events")
    first = await _tick(world, "events")
    assert first.mode == "full" and first.findings and not sum(first.findings.values())
    alloc, usage = await _orphan(world, "dw", event=True)
    # The worker acknowledges the event quickly; until it has, the key is in flight (not drift).
    found = await eventually(
        lambda: _found(world, "events"), timeout=30, what="the tick to check the released allocation"
    )
    assert found.mode == "incremental" and found.events_read >= 1
    assert found.findings["orphan_open_usage"] == 1 and sum(found.findings.values()) == 1
    [acted] = found.acted
    org = await world.db.fetchval("SELECT org_id FROM billing.allocations WHERE id = $1", alloc)
    assert (acted.action, acted.scope, acted.findings) == ("started", f"org:{org}", 1)
    stored = await world.db.fetchrow(
        "SELECT entity_id, settle_seconds FROM remediation.watch_findings WHERE tick_id = $1", found.tick_id
    )
    assert (stored["entity_id"], stored["settle_seconds"]) == (str(usage), 0)
    handle = world.client.get_workflow_handle(acted.workflow_id or "")
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL}, timeout=120)
    assert view.plan is not None and view.plan.counts_by_kind == {"close_orphan_usage": 1}
    # The watch's finding is recorded on the run it started, as its trigger.
    [recorded] = view.alerts
    assert (recorded.source, recorded.name) == ("drift-watch", "DriftDetected")
    assert "orphan_open_usage=1" in recorded.summary
    summary = await (await handle.describe()).static_summary()
    assert summary is not None and summary.startswith("drift_detected")
    # Nothing changed since: the next tick reads no event and starts nothing.
    again = await _tick(world, "events")
    assert (again.events_read, again.keys_checked, sum(again.findings.values()), again.acted) == (0, 0, 0, [])
    status = await watch.status(world.client, world.settings, "events")
    text = render_watch_status(status)
    assert "PAUSED" in text and f"started {acted.workflow_id}" in text and status.failures_in_a_row == 0
    await handle.terminate("test done")


async def _found(world: World, watch_id: str) -> WatchTickResult | None:
    result = await _tick(world, watch_id)
    return result if result.keys_checked else None


async def test_keys_in_flight_are_not_flagged(world: World) -> None:
    await _platform(world, "fl")
    await _enable(world, "settle", settle_seconds=3600)
    await _tick(world, "settle")  # the first, full pass
    await _orphan(world, "fl", event=True)
    young = await _tick(world, "settle")
    assert young.keys_checked == 0 and young.keys_deferred == 1 and not sum(young.findings.values())
    assert "changed less than 3600 s ago (settle time)" in young.deferred_why
    # A key the billing worker has not processed: the worker is down, its event waits on its consumer.
    await _enable(world, "worker", settle_seconds=0, act_threshold=100)
    await _tick(world, "worker")  # the first, full pass (it sees the orphan above, below the threshold)
    await world.db.execute("UPDATE billing.worker_control SET mode = 'crashed', updated_at = now()")
    await asyncio.sleep(2)  # the worker reads its mode once per pull (1 s)
    target = await world.db.fetchval(
        """SELECT a.id FROM billing.allocations a JOIN billing.usage_records u ON u.allocation_id = a.id
           AND u.end_time IS NULL WHERE a.status = 'active' AND a.id LIKE 'fl-alloc-%' ORDER BY a.id DESC LIMIT 1"""
    )
    await world.db.execute(
        "UPDATE billing.allocations SET status = 'released', released_at = now() WHERE id = $1", target
    )
    await publish_stored(world.nc, "provisioning.releasing.completed", "fl-corr", "", allocation_id=target,
                  at=datetime.now(UTC).isoformat())  # fmt: skip
    await world.nc.flush()
    waiting = await _tick(world, "worker")
    assert (waiting.keys_checked, waiting.keys_deferred, sum(waiting.findings.values())) == (0, 1, 0)
    assert "not acknowledged yet" in waiting.deferred_why and "BillingQueueLag" in waiting.deferred_why
    # The worker comes back and closes the usage itself: it never was drift.
    await world.db.execute("UPDATE billing.worker_control SET mode = 'running', updated_at = now()")
    settled = await eventually(lambda: _found(world, "worker"), timeout=30, what="the worker to catch up")
    assert not sum(settled.findings.values()) and settled.acted == []
    assert await world.db.fetchval(
        "SELECT count(*) FROM billing.usage_records WHERE allocation_id = $1 AND end_time IS NULL", target
    ) == 0  # fmt: skip


async def test_a_recreated_stream_does_not_blind_the_watch(world: World) -> None:
    """A stream recreated or restored numbers its events from 1 again: the watch reads it from its start
    and makes its next pass full, instead of waiting for a sequence the new stream may never reach."""
    await _platform(world, "rs")
    await _enable(world, "reset")
    assert (await _tick(world, "reset")).mode == "full"
    # The watermark the old stream left is far past the new one's end.
    await world.db.execute(
        "UPDATE remediation.watch_state SET watermark_seq = watermark_seq + 1000000 WHERE watch_id = 'reset'"
    )
    alloc, _ = await _orphan(world, "rs", event=True)
    read = await _tick(world, "reset")
    assert read.mode == "incremental" and read.events_read >= 1  # from the stream's start
    watermark = await world.db.fetchval(
        "SELECT watermark_seq FROM remediation.watch_state WHERE watch_id = 'reset'"
    )
    assert watermark < 1_000_000
    full = await _tick(world, "reset")
    assert full.mode == "full"  # what changed while the old stream's events were lost

    async def orphan_found() -> WatchTickResult | None:
        result = await _tick(world, "reset")
        return result if result.findings.get("orphan_open_usage") else None

    found = next((t for t in (read, full) if t.findings.get("orphan_open_usage")), None) or await eventually(
        orphan_found, timeout=30, what=f"the watch to find {alloc}'s open usage"
    )
    assert found is not None
    for acted in found.acted:
        if acted.workflow_id:
            await world.client.get_workflow_handle(acted.workflow_id).terminate("test done")


async def test_a_hand_edit_is_found_by_the_full_pass_and_not_by_the_tick(world: World) -> None:
    await _platform(world, "he")
    await _enable(world, "hand", act_threshold=5)
    await _tick(world, "hand")
    # Someone deletes a debit by hand: no event names it.
    lost = await world.db.fetchval(
        """DELETE FROM billing.ledger_entries WHERE id = (SELECT l.id FROM billing.ledger_entries l
               JOIN billing.usage_records u ON u.id = l.usage_record_id WHERE l.kind = 'usage_debit'
               AND u.org_id LIKE 'he-%' ORDER BY l.id LIMIT 1) RETURNING usage_record_id"""
    )
    tick = await _tick(world, "hand")
    assert tick.mode == "incremental" and tick.keys_checked == 0 and not sum(tick.findings.values())
    full = await _tick(world, "hand", full=True)
    assert full.mode == "full" and full.findings["unbilled_closed_usage"] == 1
    assert await world.db.fetchval(
        "SELECT entity_id FROM remediation.watch_findings WHERE tick_id = $1", full.tick_id
    ) == str(lost)  # fmt: skip
    # One finding is below this watch's threshold (5): recorded and counted, not acted on.
    [acted] = full.acted
    assert (acted.action, acted.findings, acted.workflow_id) == ("recorded", 1, None)
    # The full pass refreshed the platform summary.
    summary = await world.db.fetchval(
        "SELECT source FROM remediation.platform_summaries ORDER BY measured_at DESC LIMIT 1"
    )
    assert summary == f"drift watch {full.tick_id}"


async def test_one_remediation_per_scope_when_an_alert_a_tick_and_a_start_arrive_together(
    world: World,
) -> None:
    await _platform(world, "on")
    org = "on-org-0001"
    scope = Scope(org_id=org)

    def notice(source: Literal["alertmanager", "drift-watch"], name: str) -> AlertNotice:
        return AlertNotice(source=source, name=name, status="firing", fingerprint=f"{name}-1")

    request = RemediationRequest(
        correlation_id="on-corr", scope=scope, requested_by="ic-dana", trigger=Trigger.MANUAL
    )
    started = await asyncio.gather(
        operations.start(world.client, world.settings, request),  # the commander
        operations.start(world.client, world.settings, request.model_copy(update={"trigger": Trigger.DRIFT_DETECTED,
                         "requested_by": "drift-watch"}), notice("drift-watch", "DriftDetected")),  # the tick
        operations.start(world.client, world.settings, request.model_copy(update={"trigger": Trigger.RECONCILE_FAILED,
                         "requested_by": "alertmanager"}), notice("alertmanager", "PaymentsReconcileFailed")),  # an alert
    )  # fmt: skip
    assert len({s.workflow_id for s in started}) == 1 and len({s.run_id for s in started}) == 1
    handle = world.client.get_workflow_handle(started[0].workflow_id)
    # Describe is read from the run itself (visibility lists catch up later): the scope's latest
    # run is the one all three were answered with, and it is still running.
    latest = await handle.describe()
    assert (latest.run_id, latest.status) == (started[0].run_id, WorkflowExecutionStatus.RUNNING)
    runs = await listed_runs(world.client, started[0].workflow_id)
    assert [r.run_id for r in runs] == [started[0].run_id]
    view: StatusView = await eventually(
        lambda: _with_alerts(handle, 2), timeout=30, what="both notices recorded"
    )
    assert {a.source for a in view.alerts} == {"drift-watch", "alertmanager"}
    await handle.terminate("test done")


async def _with_alerts(handle: object, n: int) -> StatusView | None:
    from contracts import names

    view = await handle.query(names.QUERY_STATUS, result_type=StatusView)  # type: ignore[attr-defined]
    return view if len(view.alerts) >= n else None


async def test_a_paused_schedule_runs_nothing_and_a_resumed_one_ticks(world: World) -> None:
    await _platform(world, "ps")
    await _enable(world, "paused", every_seconds=10)
    await asyncio.sleep(12)
    assert not await world.db.fetchval(
        "SELECT count(*) FROM remediation.watch_ticks WHERE watch_id = 'paused'"
    )
    await watch.resume(world.client, "paused", "test")
    ticked = await eventually(
        lambda: world.db.fetchval(
            "SELECT tick_id FROM remediation.watch_ticks WHERE watch_id = 'paused' AND outcome = 'ok'"
        ),
        timeout=40,
        what="a scheduled tick",
    )
    assert ticked.startswith("drift-watch-paused-tick-")
    await watch.pause(world.client, "paused", "test")
    await watch.disable(world.client, "paused")
    with pytest.raises(operations.OperationError, match="no drift watch 'paused'"):
        await watch.status(world.client, world.settings, "paused")


async def test_a_failing_tick_shows_in_metrics_and_status(world: World) -> None:
    await _platform(world, "ft")
    await _enable(world, "failing")
    await _tick(world, "failing")
    world.nats_server.stop()
    try:
        with pytest.raises(operations.OperationError, match="NATS"):
            await _tick(world, "failing")
    finally:
        world.nats_server.start()
    status = await watch.status(world.client, world.settings, "failing")
    assert status.failures_in_a_row == 1 and "NATS" in (status.last_tick or {}).get("error", "")
    assert "FAILING: the last 1 tick(s) failed" in render_watch_status(status)
    metrics = {
        (family.name, tuple(sample.labels.items())): sample.value
        for family in await watch_families(world.db)
        for sample in family.samples
    }
    assert metrics[("remediation_watch_ticks", (("watch", "failing"), ("outcome", "failed")))] == 1
    assert metrics[("remediation_watch_ticks", (("watch", "failing"), ("outcome", "ok")))] == 1
    assert metrics[("remediation_watch_interval_seconds", (("watch", "failing"),))] == 3600


async def test_a_payment_handed_to_the_payments_team_starts_no_remediation_on_every_pass(
    world: World,
) -> None:
    await _platform(world, "ho")
    await _enable(world, "handed")
    await _tick(world, "handed")
    session = await world.db.fetchval(
        """UPDATE billing.payment_sessions SET status = 'failed_reconcile' WHERE id = (
               SELECT id FROM billing.payment_sessions WHERE status = 'completed' AND id LIKE 'ho-%' ORDER BY id LIMIT 1)
           RETURNING id"""
    )
    # A finished remediation handed it to the payments team (its plan's investigate_payment action).
    await world.db.execute(
        """INSERT INTO remediation.runs (run_id, workflow_id, correlation_id, trigger, scope, requested_by, dry_run)
           VALUES ('ho-run', 'remediation-old', 'ho', 'reconcile_failed', '{}', 'ic', false);
           INSERT INTO remediation.plans (plan_id, run_id, pass, plan_hash, action_count, debit_total_minor,
               credit_total_minor, counts_by_kind) VALUES ('ho-plan', 'ho-run', 0, 'h', 1, 0, 0, '{}')"""
    )
    await world.db.execute(
        """INSERT INTO remediation.plan_actions (plan_id, seq, kind, entity_type, entity_id, org_id, amount_minor,
               idempotency_key) SELECT 'ho-plan', 1, 'investigate_payment', 'payment_session', id, org_id, 0, 'k'
           FROM billing.payment_sessions WHERE id = $1""",
        session,
    )
    full = await _tick(world, "handed", full=True)
    assert full.findings["payment_drift"] == 1
    assert [(a.action, a.findings, a.workflow_id) for a in full.acted] == [("handed_over", 1, None)]


async def test_the_watch_commands_as_a_commander_runs_them(
    world: World, temporal_env: WorkflowEnvironment
) -> None:
    await _platform(world, "cl")
    env = worker_env(world.settings, temporal_address(temporal_env))

    async def remediate(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "remediate"), *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
        return proc.returncode or 0, out.decode()

    assert await remediate("watch", "enable", "--every", "5x") == (
        2, "error: --every: '5x' is not a duration like 30s, 1m, 24h or 7d\n"
    )  # fmt: skip
    assert await remediate("watch", "enable", "--every", "5s") == (
        2, "error: --every: Input should be greater than or equal to 10 (got 5)\n"
    )  # fmt: skip
    code, out = await remediate("watch", "status", "--watch", "bad id!")
    assert code == 1 and "malformed watch id 'bad id!'" in out
    code, out = await remediate(
        "watch", "enable", "--watch", "cli", "--every", "1h", "--settle", "0s", "--paused"
    )
    assert code == 0 and "drift watch cli enabled: schedule drift-watch-cli" in out, out
    code, out = await remediate("watch", "run-now", "--watch", "cli")
    assert code == 0 and "**Drift watch tick (full)**" in out, out
    code, out = await remediate("watch", "status", "--watch", "cli")
    assert code == 0 and "PAUSED" in out and "next ticks: none while paused" in out and " full " in out, out
    assert (await remediate("watch", "disable", "--watch", "cli"))[0] == 0
    code, out = await remediate("watch", "status", "--watch", "cli")
    assert code == 1 and "no drift watch 'cli'" in out
