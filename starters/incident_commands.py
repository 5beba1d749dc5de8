"""`remediate` commands of the incident commander and the approvers: start, status, plan, approve,
reject, decide, abort, list, evidence, verify-launch-guard."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from contracts.names import TRIGGERS
from starters.cli_app import (
    app,
    cli_client,
    cli_settings,
    fail,
    invalid,
    run_async,
)

if TYPE_CHECKING:
    from config import Settings
    from contracts.models import RemediationRequest


@app.command()
def start(
    correlation_id: Annotated[str, typer.Option("--correlation-id")],
    trace_id: Annotated[str | None, typer.Option("--trace-id")] = None,
    org: Annotated[str | None, typer.Option("--org")] = None,
    project: Annotated[str | None, typer.Option("--project")] = None,
    user: Annotated[str | None, typer.Option("--user")] = None,
    allocation: Annotated[str | None, typer.Option("--allocation")] = None,
    app_instance: Annotated[str | None, typer.Option("--app-instance")] = None,
    usage_source: Annotated[str | None, typer.Option("--usage-source")] = None,
    component: Annotated[str | None, typer.Option("--component")] = None,
    trigger: Annotated[str, typer.Option("--trigger", help=", ".join(TRIGGERS))] = "manual",
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
    wait: Annotated[bool, typer.Option("--wait")] = False,
    requested_by: Annotated[str, typer.Option("--as", help="who starts it (audited)")] = "incident-commander",
) -> None:
    """Start a remediation (or attach to the one running for the same scope)."""
    from pydantic import ValidationError

    from contracts.models import RemediationRequest, Scope

    try:
        request = RemediationRequest(
            correlation_id=correlation_id,
            trace_id=trace_id,
            trigger=trigger,
            dry_run=dry_run,
            requested_by=requested_by,
            scope=Scope(
                org_id=org,
                project_id=project,
                user_id=user,
                allocation_id=allocation,
                app_instance_id=app_instance,
                usage_source=usage_source,
                control_plane_component=component,
            ),
        )
    except ValidationError as err:
        invalid(err)
    settings = cli_settings()
    started = run_async(start_checked(settings, request, wait))
    typer.echo(
        f"workflow id: {started[0].workflow_id}"
        + (" (attached to the running remediation)" if started[0].attached else "")
    )
    typer.echo(f"UI: {started[0].ui_link}")
    if started[0].trace_id:
        typer.echo(f"trace: {started[0].trace_id}")
    if started[1]:
        typer.echo(started[1])


@app.command("verify-launch-guard")
def verify_launch_guard(
    org: Annotated[str, typer.Option("--org")],
    project: Annotated[str | None, typer.Option("--project")] = None,
    expect: Annotated[str, typer.Option("--expect", help="restricted | recovered")] = "restricted",
    sku: Annotated[str, typer.Option("--sku")] = "compute-vm-small",
    correlation_id: Annotated[str | None, typer.Option("--correlation-id")] = None,
    no_submit_probe: Annotated[bool, typer.Option("--no-submit-probe")] = False,
    requested_by: Annotated[str, typer.Option("--as", help="who runs it (audited)")] = "incident-commander",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Verify the launch boundary (posture, precheck, submit 402) against the expected state; exit 1 if not."""
    from pydantic import ValidationError

    from contracts.models import LaunchGuardVerifyRequest

    try:
        request = LaunchGuardVerifyRequest(
            correlation_id=correlation_id or f"launch-guard-{org}",
            org_id=org,
            project_id=project,
            expect=expect,  # validated by the model
            sku=sku,
            probe_submit=not no_submit_probe,
            requested_by=requested_by,
        )
    except ValidationError as err:
        invalid(err)
    settings = cli_settings()

    async def go() -> tuple[str, Any]:
        import remediation_client as operations

        return await operations.verify_launch_guard(await cli_client(settings), settings, request)

    workflow_id, report = run_async(go())
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        typer.echo(f"workflow id: {workflow_id}")
        typer.echo(f"UI: {settings.workflow_ui_link(workflow_id)}")
        for c in report.criteria:
            typer.echo(f"  {'ok  ' if c.passed else 'FAIL'} {c.name}: {c.detail}")
        typer.echo(f"launch guard {report.expect}: {'PASSED' if report.passed else 'FAILED'}")
    if not report.passed:
        raise typer.Exit(1)


async def start_checked(settings: Settings, request: RemediationRequest, wait: bool) -> tuple[Any, str]:
    """`remediate start`: refuse a scope that contradicts the billing data, then start (or attach)."""
    import remediation_client as operations

    await operations.preflight(settings, request)
    client = await cli_client(settings)
    started = await operations.start(client, settings, request)
    result = ""
    if wait:
        from contracts.models import RemediationResult

        outcome = await client.get_workflow_handle(
            started.workflow_id, result_type=RemediationResult
        ).result()
        result = f"outcome: {outcome.outcome.value}"
    return started, result


@app.command()
def status(workflow_id: str) -> None:
    """Phase, findings by kind, plan totals, approvals, verdict."""
    import remediation_client as operations
    from starters.render import render_status

    settings = cli_settings()

    async def go() -> str:
        # Only an ended run can have been reversed; the lookup runs beside Temporal's answer and is
        # dropped (errors included) when the run is still going.
        reversals = asyncio.ensure_future(operations.reversals_of(settings, workflow_id))
        try:
            view = await operations.status(await cli_client(settings), workflow_id)
        except BaseException:
            reversals.cancel()
            raise
        if not view.phase.ended:
            reversals.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reversals
            return render_status(workflow_id, view)
        return "\n".join([render_status(workflow_id, view), *operations.reversed_by_words(await reversals)])

    typer.echo(run_async(go()))


@app.command()
def plan(workflow_id: str, limit: int = 50) -> None:
    """The plan awaiting approval and its first actions."""
    import remediation_client as operations
    from contracts.models import format_money

    settings = cli_settings()

    async def go() -> str:
        summary = await operations.plan(await cli_client(settings), workflow_id)
        if summary is None:
            return "no plan yet"
        actions = await operations.plan_actions(settings, summary.plan_id, limit)
        lines = [
            f"plan {summary.plan_id} hash {summary.plan_hash}",
            f"{summary.action_count} actions, debits "
            f"{summary.debit_total_minor}, credits {summary.credit_total_minor} (minor units)",
        ]
        if summary.findings_from:
            lines.append(f"findings from {summary.findings_from}")
        if summary.reverses_run_id:
            lines.append(
                f"reverses run {summary.reverses_run_id} (exact inverses; its requester may not approve)"
            )
        orgs, users = await operations.customer_balances(settings, summary.plan_id)
        shown = [(c["org_id"], c) for c in orgs if c["balance_before"] is not None]
        shown += [(f"{u['org_id']} / {u['user_id']}", u) for u in users if u["balance_before"] is not None]
        if shown:
            lines.append("customers and users (balance now -> after the plan):")
            lines += [
                f"  {who:<36} {format_money(c['balance_before'], c['currency']):>18} ->"
                f" {format_money(c['balance_after'], c['currency']):>18}"
                for who, c in shown
            ]
        lines += [
            f"  {a['seq']:>5} {a['kind']:<28} {a['entity_type']}:{a['entity_id']:<24} {a['amount_minor']:>10}"
            f"  {a['idempotency_key']}" + (f"  {a['effect']}" if a["effect"] else "")
            for a in actions
        ]
        return "\n".join(lines)

    typer.echo(run_async(go()))


def _decide(
    workflow_id: str, plan_hash: str, approver: str, comment: str, decision: str, key: Path | None
) -> None:
    import remediation_client as operations

    settings = cli_settings()

    async def go() -> str:
        return await operations.decide_plan(
            await cli_client(settings),
            settings,
            workflow_id,
            plan_hash=plan_hash,
            approver=approver,
            decision=decision,
            comment=comment,
            key_path=key,
        )

    typer.echo(run_async(go()))


KeyOption = Annotated[
    Path | None,
    typer.Option("--key", help="the approver's private key (default: APPROVER_KEYS_DIR/NAME.key)"),
]


@app.command()
def approve(
    workflow_id: str,
    plan_hash: Annotated[str, typer.Option("--plan", help="the plan hash (or a prefix of 8+ characters)")],
    approver: Annotated[str, typer.Option("--as")],
    comment: str = "",
    key: KeyOption = None,
) -> None:
    """Sign and approve the plan awaiting approval (refusals are immediate and audited)."""
    _decide(workflow_id, plan_hash, approver, comment, "approve", key)


@app.command()
def reject(
    workflow_id: str,
    plan_hash: Annotated[str, typer.Option("--plan")],
    approver: Annotated[str, typer.Option("--as")],
    comment: str = "",
    key: KeyOption = None,
) -> None:
    """Sign and reject the plan: the run ends with evidence and no change."""
    _decide(workflow_id, plan_hash, approver, comment, "reject", key)


@app.command()
def decide(
    workflow_id: str,
    choice: Annotated[str, typer.Argument(help="retry or hand_off")],
    actor: Annotated[str, typer.Option("--as")],
    comment: str = "",
) -> None:
    """After a failed verification: retry the remediation or hand off."""
    if choice not in ("retry", "hand_off"):
        fail("choice must be 'retry' or 'hand_off'")
    import remediation_client as operations

    settings = cli_settings()

    async def go() -> str:
        return await operations.decide_verdict(
            await cli_client(settings), workflow_id, actor=actor, choice=choice, comment=comment
        )

    typer.echo(run_async(go()))


@app.command()
def abort(workflow_id: str) -> None:
    """Cancel a remediation (the freeze is lifted and evidence captured)."""
    import remediation_client as operations

    settings = cli_settings()

    async def go() -> None:
        await operations.abort(await cli_client(settings), workflow_id)

    run_async(go())
    typer.echo(f"cancellation requested for {workflow_id}")


@app.command("list")
def list_(
    phase: Annotated[str | None, typer.Option("--phase")] = None,
    org: Annotated[str | None, typer.Option("--org")] = None,
    correlation_id: Annotated[str | None, typer.Option("--correlation-id")] = None,
) -> None:
    """Remediations, filtered by the custom search attributes."""
    import remediation_client as operations

    settings = cli_settings()

    async def go() -> list[dict[str, Any]]:
        query = operations.list_query(phase=phase, org=org, correlation_id=correlation_id)
        return await operations.list_runs(await cli_client(settings), query)

    for row in run_async(go()):
        typer.echo(
            f"{row['workflow_id']:<50} {row['status']:<11} {row['phase'] or '-':<20} "
            f"{row['org'] or '-':<14} {row['correlation_id'] or '-'}"
        )


@app.command("verify-evidence")
def verify_evidence(workflow_id: str) -> None:
    """Recompute the latest run's audit chain and check the evidence pack's signature (exit 1 naming the first difference)."""
    import remediation_client as operations

    problems, facts = run_async(operations.verify_evidence(cli_settings(), workflow_id))
    for line in facts:
        typer.echo(line)
    if problems:
        for line in problems:
            typer.echo(f"FAILED: {line}", err=True)
        raise typer.Exit(1)
    typer.echo("evidence verified: the audit chain is whole and the pack is signed by the trusted key")


@app.command()
def evidence(workflow_id: str, format: Annotated[str, typer.Option("--format")] = "markdown") -> None:
    """The evidence pack of the latest run: markdown, json (docs/schemas/evidence.schema.json) or html."""
    import remediation_client as operations
    from starters.render import render_evidence_html, render_evidence_markdown

    renderers = {
        "markdown": render_evidence_markdown,
        "json": lambda doc: json.dumps(doc, indent=2),
        "html": render_evidence_html,
    }
    if format not in renderers:
        fail("--format must be markdown, json or html")
    doc = run_async(operations.evidence(cli_settings(), workflow_id, reversals=True))
    typer.echo(renderers[format](doc))
