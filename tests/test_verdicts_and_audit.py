"""Verdicts and audit that cannot be fooled (issue 25), on the real servers.

Each test reproduces one hole an independent check found: a poison-message loop judged "stable", a stale
platform summary reported as consistent, a rollback outside the signed hash, a pack without most of the
diagnosis, rows appended after the seal, a refused approval audited with the wrong plan, a handed-over
alert restarting remediations, a token in a world-readable log, ports in the ephemeral range.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import stat
import subprocess
import sys
from html import escape
from pathlib import Path

import jsonschema
import pytest
from temporalio.testing import WorkflowEnvironment

import remediation_client as operations
from activities.postgres.consistency_sql import INDEXED, SCANNING
from activities.postgres.plan import plan_content_hash
from activities.postgres.platform_summary import record_platform_summary
from config.approver_keys import sign
from contracts import names
from contracts.models import ActionKind, ApprovalDecision, ConsumerSample, Phase, StatusView
from devstack.processes import free_port, spawn, wait_for_port
from local_platform.events import publish
from starters.render import render_evidence_html, render_evidence_markdown
from tests.conftest import APPROVER_KEYS, World
from tests.helpers import (
    ConsumerSampler,
    approve,
    approve_quorum,
    decision,
    eventually,
    incident_in,
    request_for,
    start,
    start_dispute,
    verify_evidence,
    wait_phase,
)
from worker.telemetry import configure_command_logging
from workflows.criteria import worker_criterion


async def test_a_poison_message_loop_is_not_stable_processing(world: World) -> None:
    """The worker delivers every event and acknowledges none: 'pending' falls to 0, the verdict fails."""
    sampler = ConsumerSampler(world)
    sample = sampler.sample
    threshold = world.settings.consumer_pending_threshold
    try:
        await world.db.execute("UPDATE billing.worker_control SET mode = 'poisoned'")
        for i in range(threshold * 2):
            await publish(world.nc, "provisioning.active", "poison", "", allocation_id=f"poison-{i}")
        await world.nc.flush()

        async def looping() -> tuple[ConsumerSample, ConsumerSample] | None:
            # A window in which everything was delivered (nothing undelivered, the old proxy's "0")
            # and the worker is redelivering: the shape the issue reported.
            start = await sample()
            await asyncio.sleep(1.5)
            end = await sample()
            delivered = end.pending == 0 and end.ack_pending > threshold
            return (start, end) if delivered and end.redelivered > 0 else None

        first, second = await eventually(looping, timeout=60, what="the worker to loop on poison messages")
        # Our own reading of the consumer, independent of the product's adapter.
        info = await world.nc.jetstream().consumer_info(
            world.settings.billing_stream, world.settings.billing_consumer
        )
        assert (info.num_ack_pending or 0) > threshold and (info.num_redelivered or 0) > 0
        assert second.pending <= threshold  # the undelivered count alone would have passed it
        verdict = worker_criterion(first, second, threshold)
        assert not verdict.passed, verdict
        assert f"unacknowledged {first.ack_pending} -> {second.ack_pending}" in verdict.detail
        assert f"redelivered {first.redelivered} -> {second.redelivered}" in verdict.detail
        assert "redeliver" in verdict.detail.split(":")[0]

        # Fixed, the worker acknowledges the backlog: the ack floor passes what was queued at the start.
        await world.db.execute("UPDATE billing.worker_control SET mode = 'running'")
        start = await sample()
        assert start.backlog_head > start.ack_floor

        async def recovered() -> str | None:
            verdict = worker_criterion(start, await sample(), threshold)
            return verdict.detail if verdict.passed else None

        detail = await eventually(recovered, timeout=60, what="the fixed worker to acknowledge the backlog")
        assert "redelivered" in detail and "unacknowledged" in detail
    finally:
        await world.db.execute("UPDATE billing.worker_control SET mode = 'running'")
        await sampler.close()


def test_a_backlog_under_the_threshold_still_fails_while_redeliveries_rise() -> None:
    """Few poison messages stay under the threshold; their rising redeliveries fail the window."""
    first = ConsumerSample(pending=0, ack_pending=5, ack_floor=10, backlog_head=15, redelivered=2,
                           seconds_since_active=1, status="warn")  # fmt: skip
    rising = first.model_copy(update={"redelivered": 5})
    verdict = worker_criterion(first, rising, threshold=100)
    assert not verdict.passed and "redeliveries rising" in verdict.detail and "(+3)" in verdict.detail
    left = first.model_copy(update={"redelivered": 2})
    verdict = worker_criterion(first, left, threshold=100)
    assert not verdict.passed and "2 messages redelivered and still unacknowledged" in verdict.detail
    # The same window with the floor past the start's backlog and nothing redelivered passes.
    drained = first.model_copy(update={"ack_pending": 0, "ack_floor": 15, "redelivered": 0})
    assert worker_criterion(first.model_copy(update={"redelivered": 0}), drained, threshold=100).passed


def test_default_ports_stay_below_the_ephemeral_range() -> None:
    """Every embedded default port is below 32768 and none is a well-known service's port."""
    from config import Settings

    ports = {
        name: field.default
        for name, field in Settings.model_fields.items()
        if name.endswith("_port") and isinstance(field.default, int) and field.default
    }
    assert {"postgres_port", "nats_port"} <= set(ports)
    well_known = {22, 25, 53, 80, 443, 3000, 3306, 4222, 5432, 5672, 6379, 8080, 8443, 9090, 9093, 9100, 9200}
    for name, port in ports.items():
        assert 1024 < port < 32768, f"{name}={port} is in the ephemeral range or privileged"
        assert port not in well_known, f"{name}={port} is a usual service port"
    assert len(set(ports.values())) == len(ports), f"two defaults share a port: {ports}"


async def test_a_summary_measured_before_the_drift_is_never_reported_as_consistent(world: World) -> None:
    """A platform-wide run reads a fresh summary that says 'consistent'; its reconciliation finds drift."""
    incident = await incident_in(world, "worker-crash", "stale")
    # The summary a refresher measured before the platform drifted: every consistency count zero.
    await record_platform_summary(
        world.db, "refresh (before the incident)", {}, 0, dict.fromkeys(INDEXED + SCANNING, 0), 1
    )
    handle = await start(world, request_for(incident, dry_run=True))
    result = await handle.result()
    assert result.outcome is Phase.DRY_RUN_COMPLETE
    view = await handle.query(names.QUERY_STATUS, result_type=StatusView)
    drifted = sum(view.drift.values())
    assert drifted > 0, view.drift
    check = next(c for c in view.diagnosis if c.check == "data_consistency")
    assert check.status != "ok" and not check.headline.startswith("consistent"), check
    assert f"this run's reconciliation found {drifted} drifted entities" in check.headline, check.headline
    assert re.search(r"platform summary measured at \d\d:\d\d:\d\d UTC", check.headline), check.headline
    doc = await operations.evidence(world.settings, handle.id)
    assert doc["diagnosis"]["data_consistency"]["status"] == "warn"


async def test_the_evidence_carries_every_check_and_rows_after_the_seal_fail_verification(
    world: World,
) -> None:
    incident = await incident_in(world, "user-dispute", "seal")
    handle = await start(world, request_for(incident))
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    await approve_quorum(handle, view)
    result = await handle.result()
    assert result.outcome is Phase.COMPLETED, result
    wid, run_id = handle.id, result.run_id

    # Every diagnosis check the run made is in the pack with its verdict and headline, and in each format.
    view = await handle.query(names.QUERY_STATUS, result_type=StatusView)
    doc = await operations.evidence(world.settings, wid)
    checks = {c.check for c in view.diagnosis}
    assert {"nats_consumer", "loki_logs", "event_sequence", "worker_regression", "outbox_relay"} <= checks
    assert set(doc["diagnosis"]) >= checks
    for check in view.diagnosis:
        assert doc["diagnosis"][check.check]["status"] == check.status
        assert doc["diagnosis"][check.check]["headline"] == check.headline
    schema = json.loads((Path(__file__).parents[1] / "docs/schemas/evidence.schema.json").read_text())
    jsonschema.validate(doc, schema)
    markdown = render_evidence_markdown(doc)
    html = render_evidence_html(doc)
    for check in view.diagnosis:
        assert f"| {check.check} | {check.status} |" in markdown
        assert escape(check.check) in html

    # Sealed when it ended: the untouched run verifies, the seal covering its closing entry.
    seal = await world.db.fetchrow("SELECT * FROM remediation.run_seals WHERE run_id = $1", run_id)
    links = await world.db.fetchval("SELECT count(*) FROM remediation.audit_chain WHERE run_id = $1", run_id)
    assert seal is not None and seal["chain_length"] == links > doc["integrity"]["chain_length"]
    assert seal["signature"]
    assert await verify_evidence(world, wid) == []

    # A forged approval and a forged applied credit, plain INSERTs the trigger chains like any row.
    plan_id = view.plan.plan_id if view.plan else ""
    await world.db.execute(
        """INSERT INTO remediation.approvals (run_id, plan_id, plan_hash, approver, decision, comment, accepted,
               via) VALUES ($1, $2, $3, 'mallory', 'approve', 'looks fine', true, 'update')""",
        run_id,
        plan_id,
        view.plan.plan_hash if view.plan else "",
    )
    await world.db.execute(
        """INSERT INTO remediation.applied_actions (plan_id, seq, idempotency_key, kind, outcome, actor,
               approvers, workflow_id, correlation_id, before, after)
           VALUES ($1, 9999, 'payment-credit:forged', 'credit_payment', 'applied', 'mallory', '{mallory}', $2,
                   $3, '{}', '{}')""",
        plan_id,
        wid,
        incident.correlation_id,
    )
    problems = await verify_evidence(world, wid)
    assert len(problems) == 1 and "2 audit rows were chained after the run's seal" in problems[0], problems
    assert "mallory approve" in problems[0] and "credit_payment payment-credit:forged applied" in problems[0]

    # Without the seal, the rows after the pack's head are named (the closing entry among them).
    await world.db.execute("DELETE FROM remediation.run_seals WHERE run_id = $1", run_id)
    problems = await verify_evidence(world, wid)
    assert len(problems) == 1 and "after the evidence pack's head (the run has no seal)" in problems[0]
    assert "remediation ended" in problems[0] and "mallory approve" in problems[0]


async def test_the_rollback_target_and_hook_are_signed_and_a_changed_row_is_never_applied(
    world: World,
) -> None:
    incident = await incident_in(world, "worker-regression", "signed")
    handle = await start(world, request_for(incident))
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert view.plan is not None
    plan_id, plan_hash = view.plan.plan_id, view.plan.plan_hash
    regression = next(c for c in view.diagnosis if c.check == "worker_regression")
    rollback = next(a for a in view.plan.api_actions if a.kind is ActionKind.ROLLBACK_BILLING_WORKER)
    assert rollback.from_revision == regression.counts["current_revision"]
    assert rollback.target_revision == regression.counts["rollback_to"]
    assert rollback.hook == "POST /api/v1/admin/billing-worker/rollback"

    # The CLI's plan listing (and the approval page, from the same words) shows what it will do.
    rows = await operations.plan_actions(world.settings, plan_id)
    row = next(r for r in rows if r["kind"] == "rollback_billing_worker")
    assert row["effect"] == (
        f"revision {rollback.from_revision} -> {rollback.target_revision}"
        " via POST /api/v1/admin/billing-worker/rollback"
    )

    # The hash covers the target: a row edited after the plan was built no longer hashes to it ...
    assert await plan_content_hash(world.db, plan_id) == plan_hash
    await world.db.execute(
        """UPDATE remediation.plan_actions SET params = params || '{"to_revision": 1}'
           WHERE plan_id = $1 AND kind = 'rollback_billing_worker'""",
        plan_id,
    )
    assert await plan_content_hash(world.db, plan_id) != plan_hash
    # ... and apply refuses it: approvers signed revision N, not 1; nothing is rolled back.
    await approve_quorum(handle, view)
    stopped = await wait_phase(handle, {Phase.AWAITING_DECISION})
    assert stopped.stalled is not None and "a row was changed after approval" in stopped.stalled
    current = await world.db.fetchval("SELECT revision FROM billing.worker_control WHERE id = 1")
    assert current == rollback.from_revision
    applied = await world.db.fetchval(
        "SELECT count(*) FROM remediation.applied_actions WHERE plan_id = $1", plan_id
    )
    assert applied == 0
    await handle.terminate("test done")


async def test_a_refused_stale_approval_is_audited_with_what_was_signed_and_where(world: World) -> None:
    _, handle = await start_dispute(world, "pair")
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert view.plan is not None
    run_id = (await handle.describe()).run_id
    # Alice signed an earlier plan of this run (its id and hash), sent from the CLI.
    earlier = ApprovalDecision(
        plan_hash="ab" * 32,
        approver="alice",
        decision="approve",
        comment="old page",
        plan_id="earlier-plan-p0",
    )
    signed = sign(earlier, APPROVER_KEYS["alice"]).model_copy(update={"client": "cli"})
    with pytest.raises(operations.OperationError, match="refused"):
        await operations.submit_decision(world.client, world.settings, handle.id, signed)
    row = await world.db.fetchrow(
        "SELECT plan_id, plan_hash, via, accepted FROM remediation.approvals WHERE run_id = $1 AND approver = 'alice'",
        run_id,
    )
    assert dict(row) == {
        "plan_id": "earlier-plan-p0",
        "plan_hash": "ab" * 32,
        "via": "update from cli",
        "accepted": False,
    }
    # `remediate approve --plan <prefix>` naming no plan of this run: the row names none, not the current one.
    with pytest.raises(operations.OperationError, match="stale plan"):
        await operations.decide_plan(
            world.client, world.settings, handle.id, plan_hash="deadbeef", approver="bob",
            decision="approve", comment="",
        )  # fmt: skip
    row = await world.db.fetchrow(
        "SELECT plan_id, plan_hash, via FROM remediation.approvals WHERE run_id = $1 AND approver = 'bob'",
        run_id,
    )
    assert dict(row) == {"plan_id": None, "plan_hash": "deadbeef", "via": "update from cli"}
    # An accepted decision from the CLI says so too.
    await approve(handle, decision(view, "alice").model_copy(update={"client": "cli"}), "approve-alice")

    async def accepted() -> str | None:
        via: str | None = await world.db.fetchval(
            "SELECT via FROM remediation.approvals WHERE run_id = $1 AND accepted", run_id
        )
        return via

    assert await eventually(accepted, what="the accepted approval's audit") == "update from cli"
    await handle.terminate("test done")


def test_service_logs_are_private(tmp_path: Path) -> None:
    """Logs the stack writes (they name links and paths) are 0600 in a 0700 directory, like the tokens."""
    log_file = tmp_path / "logs" / "svc.log"
    pid = spawn(["sh", "-c", "echo started"], pid_file=tmp_path / "svc.pid", log_file=log_file)
    # Another test's event loop may reap the child first (its child watcher): then it has exited too.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(log_file.parent.stat().st_mode) == 0o700
    assert log_file.read_text() == "started\n"
    # The CLI's own JSON log too.
    cli_log = tmp_path / "cli" / "cli.log"
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        configure_command_logging(cli_log, "file")
        assert stat.S_IMODE(cli_log.stat().st_mode) == 0o600
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved
        root.setLevel(level)


async def test_the_approval_page_token_never_reaches_its_log(
    world: World, temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    """`approvals serve` under `dev up` writes to a log file: the link there names the token file, not the token."""
    token_file = tmp_path / "approvals.token"
    token_file.write_text("secret-approvals-token-value")
    token_file.chmod(0o600)
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": world.settings.resolved_database_url(),
        "TEMPORAL_ADDRESS": temporal_env.client.service_client.config.target_host,
        "APPROVALS_PORT": str(port),
        "APPROVALS_TOKEN_FILE": str(token_file),
        "REMEDIATION_STATE_DIR": str(tmp_path / "state"),
        "PAYLOAD_ENCRYPTION": "off",
    }
    log_file = tmp_path / "approval-page.log"
    with log_file.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "remediate"), "approvals", "serve",
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        await asyncio.to_thread(
            wait_for_port, port, timeout=60, name="approval page", log_file=log_file, pid=proc.pid
        )
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=30)
    text = log_file.read_text()
    assert "secret-approvals-token-value" not in text, text
    assert f"?token=<the token in {token_file}>" in text, text
