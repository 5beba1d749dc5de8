"""`make demo`: a billing-worker crash touching all four drift kinds, remediated end to end."""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import UTC, datetime
from typing import Any

import remediation_client as operations
from config import Settings
from contracts.models import Phase, RemediationRequest, RemediationResult, Scope, StatusView, Trigger
from contracts.watch import WatchConfig, WatchTickResult
from local_platform.incidents import run_incident
from local_platform.provider_payments import seeder_for
from local_platform.serve import platform_connections
from starters.render import render_evidence_markdown, render_status


def _say(text: str) -> None:
    print(text, flush=True)


async def _wait_phase(client: object, workflow_id: str, phases: set[Phase], timeout: float = 180) -> Phase:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            view = await operations.status(client, workflow_id)  # type: ignore[arg-type]
            if view.phase in phases:
                return view.phase
        except operations.OperationError:
            pass
        await asyncio.sleep(0.5)
    raise operations.OperationError(
        f"{workflow_id} did not reach {sorted(p.value for p in phases)} in {timeout}s"
    )


async def _show_traces(settings: Settings, incident_trace: str, own_trace: str | None) -> None:
    """The incident's trace and the remediation's own, side by side, through the Tempo API."""
    if own_trace is None:
        return
    import httpx
    from opentelemetry import trace

    from activities.tempo import TempoActivities, summarize

    flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if flush is not None:
        await asyncio.to_thread(flush)
    _say("== 7. Traces (Tempo API; the worker exports its spans over OTLP)")
    async with httpx.AsyncClient(base_url=settings.resolved_tempo_url(), timeout=10) as http:
        tempo = TempoActivities(http, settings.tempo_tenant)
        for label, trace_id in (("incident", incident_trace), ("remediation", own_trace)):
            summary = summarize(await tempo.fetch_trace(trace_id) or [])
            # The worker batches its spans (about every 5 s): wait for them rather than show half a trace.
            for _ in range(30):
                if label == "incident" or "billing-remediation-worker" in summary["services"]:
                    break
                await asyncio.sleep(0.5)
                summary = summarize(await tempo.fetch_trace(trace_id) or [])
            _say(
                f"   {label:<11} trace {trace_id}: {summary['spans']} spans from "
                + ", ".join(summary["services"])
            )


def _alerting_runs(settings: Settings) -> bool:
    """True when the alerting loop is up: Prometheus, Alertmanager and the alert intake answer."""
    from urllib.parse import urlsplit

    from devstack.processes import port_accepts

    urls = (settings.resolved_prometheus_url(), settings.resolved_alertmanager_url())
    ends = [urlsplit(u) for u in urls]
    return all(port_accepts(e.port or 80, e.hostname or "127.0.0.1") for e in ends) and port_accepts(
        settings.alerts_port, settings.alerts_host
    )


async def _show_alerts(client: object, workflow_id: str, status: str, timeout: float = 45) -> None:
    """Alertmanager's notifications recorded on the run: the alert that attached to it, then its resolution.

    Prometheus evaluates the shipped rules against the stand-in's metrics; Alertmanager posts to the
    alert intake, which records each alert on the remediation of its scope (bounded wait: the demo
    goes on, saying so, if the alerting stack is not running).
    """
    deadline = time.monotonic() + timeout
    while True:
        view = await operations.status(client, workflow_id)  # type: ignore[arg-type]
        wanted = "firing" if status == "fired" else status
        shown = [a for a in view.alerts if a.source == "alertmanager" and a.status == wanted]
        if shown or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    if not shown:
        _say(
            f"   (no Alertmanager notification {status} within {timeout:g} s: is `remediate dev status` all healthy?)"
        )
        return
    title = "attached to this remediation" if status == "fired" else "resolved, recorded on the run"
    _say(f"== Alerts (Prometheus → Alertmanager → alert intake): {title}")
    for alert in shown:
        when = alert.ends_at if alert.status == "resolved" else alert.starts_at
        _say(f"   {alert.name}: {alert.status}{f' at {when:%H:%M:%S}' if when else ''} - {alert.summary}")


async def run_demo(settings: Settings) -> int:
    """Run the scenario; returns the process exit code."""
    from worker.connection import connect_temporal
    from worker.telemetry import configure_tracing

    configure_tracing("billing-remediation-cli", settings.otlp_endpoint)

    prefix = f"d{int(time.time()) % 10_000_000}"
    async with platform_connections(settings) as (conn, nc), seeder_for(settings) as provider:
        _say("== 1. Incident: the billing worker crashed; queue lag and drift of all four kinds")
        incident = await run_incident("worker-crash", conn, nc, prefix=prefix, provider=provider)
    _say("   injected: " + ", ".join(f"{k}={len(v)}" for k, v in incident.injected.items()))

    client = await connect_temporal(settings)
    request = RemediationRequest(
        correlation_id=incident.correlation_id,
        trace_id=incident.trace_id,
        trigger=Trigger.WORKER_FAILURE,
        requested_by="ic-dana",
        scope=Scope(),
    )
    _say("== 2. The incident commander starts the remediation")
    started = await operations.start(client, settings, request)
    _say(f"   workflow id: {started.workflow_id}\n   UI: {started.ui_link}")
    if started.attached:
        # Never approve someone else's run: the commander decides what happens to it.
        _say(
            f"   a remediation of this scope is already running ({started.ui_link});"
            f" finish it or stop it with `remediate abort {started.workflow_id}`, then run the demo again"
        )
        return 1

    phase = await _wait_phase(
        client, started.workflow_id, {Phase.AWAITING_APPROVAL, Phase.COMPLETED, Phase.FAILED}
    )
    view = await operations.status(client, started.workflow_id)
    _say("== 3. Diagnosis and plan")
    _say(render_status(started.workflow_id, view))
    if phase is not Phase.AWAITING_APPROVAL or view.plan is None:
        _say(f"unexpected phase {phase.value}")
        return 1

    await _show_page(settings, started.workflow_id)
    alerting = _alerting_runs(settings)
    if alerting:
        await _show_alerts(client, started.workflow_id, "fired")
    else:
        _say("   (Prometheus, Alertmanager or the alert intake is not running: no alerts in this demo)")

    _say("== 4. Approvals (widespread plan: quorum of two, the requester may not approve)")
    for approver in [a.name for a in settings.approvers][: view.approvals_needed]:
        answer = await operations.decide_plan(
            client,
            settings,
            started.workflow_id,
            plan_hash=view.plan.plan_hash,
            approver=approver,
            decision="approve",
            comment="matches the incident findings",
        )
        _say(f"   {approver}: {answer}")

    _say("== 5. Remediation, verification, evidence")
    # Bounded: a run that stops for a human (failed verification) or never finishes ends the demo
    # with what to do next, never with a terminal that waits forever.
    try:
        phase = await _wait_phase(
            client,
            started.workflow_id,
            {p for p in Phase if p.ended} | {Phase.AWAITING_DECISION},
            timeout=settings.demo_timeout_seconds,
        )
    except operations.OperationError as err:
        view = await operations.status(client, started.workflow_id)
        _say(render_status(started.workflow_id, view))
        _say(f"demo timed out: {err}; the run is still {view.phase.value}.")
        _say(
            f"Follow it with `remediate status {started.workflow_id}`; stop it with `remediate abort {started.workflow_id}`."
        )
        return 1
    view = await operations.status(client, started.workflow_id)
    _say(render_status(started.workflow_id, view))
    if phase is Phase.AWAITING_DECISION:
        _say(decision_help(started.workflow_id, view, settings.approvers[0].name))
        return 1
    result = await client.get_workflow_handle(started.workflow_id, result_type=RemediationResult).result()
    _say(f"   outcome: {result.outcome.value}")
    if alerting:
        await _show_alerts(client, started.workflow_id, "resolved")
    doc = await operations.evidence(settings, started.workflow_id)
    markdown = render_evidence_markdown(doc)
    _say("== 6. Evidence summary (full pack: remediate evidence " + started.workflow_id + ")")
    lines = markdown.splitlines()
    # Up to the customers' own summaries, the first three of them.
    end = lines.index("## Impacted scope") if "## Impacted scope" in lines else 12
    shown = lines[:end]
    customers = [i for i, line in enumerate(shown) if line.startswith("### ")]
    _say("\n".join(shown[: customers[3]] if len(customers) > 3 else shown))
    if len(customers) > 3:
        _say(f"   ... and {len(customers) - 3} more customer summaries")
    differ = [b for b in doc["balances"] if b["difference"]]
    users = sum(1 for b in doc["balances"] if b.get("user_id"))
    _say(
        f"   balances: {len(doc['balances']) - len(differ)} of {len(doc['balances'])} exactly as the plan predicted"
        f" ({len(doc['balances']) - users} orgs, {users} users)"
        + "".join(f"; {b['org_id']} {b.get('user_id') or ''}: {b['explained']}" for b in differ)
    )
    await _show_traces(settings, incident.trace_id, started.trace_id)
    if not await _watch_finds_silent_drift(client, settings, prefix):
        return 1
    _say(f"\nTemporal UI: {started.ui_link}")
    # `make demo-soak` keeps the output in files: the token only reaches a terminal.
    link = settings.approvals_link(to_terminal=sys.stdout.isatty())
    if link is not None:
        _say(f"Approval page: {link}  (plans waiting for a decision)")
    _say("The stack is still running. Explore the UI, then stop everything with: make down")
    return 0 if result.outcome is Phase.COMPLETED else 1


async def _show_page(settings: Settings, workflow_id: str) -> None:
    """The page the approvers got for the plan (Alertmanager → email → the embedded approver inbox)."""
    from devstack.approver_inbox import inbox_folder, read_pages

    folder = inbox_folder(settings)
    if not folder.exists():
        _say("   (the approver inbox is not running: no approver pages in this demo)")
        return
    for _ in range(60):
        pages = [
            p
            for p in read_pages(folder)
            if p.link and p.link.endswith(f"/runs/{workflow_id}") and not p.resolved
        ]
        if pages:
            break
        await asyncio.sleep(0.5)
    else:
        _say("   (no approver page arrived within 30 s: is `remediate dev status` all healthy?)")
        return
    _say("== Approvers paged (Alertmanager → email to tier 1, kept by the embedded approver inbox)")
    _say(f"   to {pages[-1].to}: {pages[-1].subject}")
    _say(f"   link: {pages[-1].link}")


async def _watch_finds_silent_drift(client: Any, settings: Settings, prefix: str) -> bool:
    """The drift watch finds drift no alert reported: a release the billing worker dropped."""
    from local_platform.events import publish_stored
    from remediation_client import watch

    _say("== 8. The drift watch: drift that raises no alert, found before a customer disputes it")
    config = WatchConfig(watch_id="global", every_seconds=60, full_every_seconds=86_400, settle_seconds=0)
    # Created paused: on this shared dev stack the demo runs its ticks itself (`remediate watch resume`
    # lets it tick every minute).
    await watch.enable(client, settings, config, "demo", paused=True)
    first = await watch.run_now(client, "global")
    _say(f"   first tick ({first.mode} pass): " + _found_words(first))
    async with platform_connections(settings) as (conn, nc):
        row = await conn.fetchrow(
            """UPDATE billing.allocations SET status = 'released', released_at = now() WHERE id = (
                   SELECT a.id FROM billing.allocations a JOIN billing.usage_records u ON u.allocation_id = a.id
                   AND u.end_time IS NULL WHERE a.status = 'active' AND a.id LIKE $1 ORDER BY a.id LIMIT 1)
               RETURNING id, org_id""",
            f"{prefix}-alloc-%",
        )
        # The release is announced, and the worker drops it (as a redelivery it skips): the usage stays open.
        await publish_stored(nc, "provisioning.releasing.completed", f"{prefix}-silent", "",
                             allocation_id=row["id"], at=datetime.now(UTC).isoformat(), replayed=True)  # fmt: skip
    _say(f"   allocation {row['id']} released; its usage record was never closed (no alert fires for this)")
    tick = await watch.run_now(client, "global")
    _say(
        f"   next tick ({tick.mode}, {tick.events_read} event(s), {tick.keys_checked} key(s) checked): "
        + _found_words(tick)
    )
    started = [a for a in tick.acted if a.workflow_id]
    if not started or not tick.findings.get("orphan_open_usage"):
        _say("   the watch did not find the drift: see `remediate watch status`")
        return False
    view = await operations.status(client, started[0].workflow_id or "")
    for _ in range(240):
        if view.phase is Phase.AWAITING_APPROVAL:
            break
        await asyncio.sleep(0.5)
        view = await operations.status(client, started[0].workflow_id or "")
    plan = view.plan.counts_by_kind if view.plan else {}
    _say(f"   {started[0].workflow_id}: {view.phase.value}, plan {plan} (trigger drift_detected)")
    _say("   (left waiting for approval: approve it on the approval page or with `remediate approve`)")
    _say("   `remediate watch status` shows the ticks; `remediate watch resume` lets it tick every minute")
    return view.phase is Phase.AWAITING_APPROVAL


def _found_words(tick: WatchTickResult) -> str:
    found = ", ".join(f"{k}={v}" for k, v in tick.findings.items() if v) or "no drift"
    acted = "; ".join(f"{a.action} {a.workflow_id or a.scope} ({a.findings})" for a in tick.acted)
    return found + (f"; {acted}" if acted else "")


def decision_help(workflow_id: str, view: StatusView, actor: str) -> str:
    """What failed in the verification and the exact commands that decide the run (``actor``: an approver)."""
    if view.verification is None:
        # Apply stopped before verification (the reason is in `remediate status` and the UI's details).
        lines = [
            "the remediation stopped before verification; it waits for an incident commander's decision."
        ]
    else:
        lines = ["verification FAILED; the remediation waits for an incident commander's decision."]
        lines += [f"   failed: {c.name}: {c.detail}" for c in view.verification.criteria if not c.passed]
    lines += [
        "Decide with one of:",
        f'   remediate decide {workflow_id} retry --as {actor} --comment "cause fixed, verify again"',
        f'   remediate decide {workflow_id} hand_off --as {actor} --comment "needs a human: <why>"',
    ]
    return "\n".join(lines)
