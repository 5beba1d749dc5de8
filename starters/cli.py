"""`remediate`: the incident commander's and approvers' command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from config import Settings, load_settings
from devstack import StackError
from workflows.models import RemediationRequest, Scope, Trigger

T = TypeVar("T")
app = typer.Typer(
    help="Durable, auditable billing remediation on Temporal.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
dev = typer.Typer(help="The embedded stack (Postgres, NATS, Temporal) on loopback.", no_args_is_help=True)
platform = typer.Typer(help="The local billing platform stand-in.", no_args_is_help=True)
app.add_typer(dev, name="dev")
keys = typer.Typer(help="Approver signing keys (Ed25519).", no_args_is_help=True)
app.add_typer(platform, name="platform")
app.add_typer(keys, name="keys")
alerts = typer.Typer(help="Alert intake: Alertmanager webhooks and NATS events start remediations.")
app.add_typer(alerts, name="alerts")
deployment = typer.Typer(
    help="Worker Deployment Versioning: which build new runs go to.", no_args_is_help=True
)
app.add_typer(deployment, name="deployment")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _invalid(err: ValidationError) -> None:
    """Refuse bad input naming the field, before anything starts."""
    from workflows.input_errors import explain

    _fail(explain(err))


def _run(coro: Coroutine[Any, Any, T]) -> T:
    import asyncpg
    from nats.errors import Error as NatsError
    from temporalio.service import RPCError

    from starters.operations import OperationError
    from worker.payload_codec import PayloadKeyError

    try:
        return asyncio.run(coro)
    except (OperationError, PayloadKeyError) as err:
        _fail(str(err), 1)
    except (OSError, NatsError) as err:
        _fail(f"cannot reach a dependency ({type(err).__name__}): {err}; is `remediate dev up` running?", 1)
    except asyncpg.PostgresError as err:
        _fail(f"Postgres refused the request ({type(err).__name__}): {err}", 1)
    except RPCError as err:
        _fail(f"Temporal refused the request: {err.message}", 1)
    raise AssertionError("unreachable")


def _settings() -> Settings:
    try:
        return load_settings()
    except ValidationError as err:
        from workflows.input_errors import explain

        # Settings may hold secrets: the rule, never the value.
        _fail(f"configuration {explain(err, echo=False)}")
    raise AssertionError("unreachable")


async def _client(settings: Settings) -> Any:
    from worker.main import connect_temporal
    from worker.telemetry import configure_command_logging, configure_tracing

    # What the commander does is logged as JSON lines (to the state directory's log, and to stderr unless
    # stderr is a terminal); stdout and a terminal's stderr stay for people.
    configure_command_logging(settings.state_dir / "logs" / "cli.log", settings.cli_log)
    configure_tracing("billing-remediation-cli", settings.otlp_endpoint)
    return await connect_temporal(settings)


# --------------------------------------------------------------------------- dev stack


@dev.command("up")
def dev_up(
    services: Annotated[bool, typer.Option(help="Also start the platform stand-in and the worker.")] = False,
) -> None:
    """Start Postgres, NATS and Temporal (skipping any configured as external)."""
    from devstack import up

    settings = _settings()
    try:
        for line in up(settings, services=services):
            typer.echo(line)
    except StackError as err:
        _fail(str(err), 1)
    if settings.worker_versioning == "on" and settings.temporal_address is None:
        # The local stack's workers serve this checkout's build: new runs go to it.
        from worker.deployment import set_current_version
        from worker.main import connect_temporal

        async def current() -> str:
            return await set_current_version(await connect_temporal(settings), settings)

        typer.echo(f"worker deployment {settings.worker_deployment_name}: build {_run(current())} is current")
    typer.echo(f"Temporal UI: {settings.resolved_ui_url()}")


@deployment.command("set-current")
def deployment_set_current(
    build: Annotated[str | None, typer.Option("--build-id", help="default: this package's version")] = None,
) -> None:
    """Send new remediations to ``build``; running ones finish on the build they started on."""
    from worker.deployment import set_current_version

    settings = _settings()

    async def go() -> str:
        return await set_current_version(await _client(settings), settings, build)

    typer.echo(f"deployment {settings.worker_deployment_name}: build {_run(go())} is current")


@dev.command("down")
def dev_down(
    purge: Annotated[
        bool, typer.Option(help="Also delete the stack's data (databases, streams, keys).")
    ] = False,
) -> None:
    """Stop exactly the processes `dev up` started."""
    from devstack import down

    for line in down(_settings(), purge=purge):
        typer.echo(line)


@dev.command("status")
def dev_status() -> None:
    """Each component, its address and health."""
    from devstack import status

    rows = status(_settings())
    for row in rows:
        health = "healthy" if row.healthy else "DOWN"
        typer.echo(f"{row.name:<9} {health:<8} {row.address:<40} {row.detail}")
    if not all(r.healthy for r in rows if r.name in ("postgres", "nats", "temporal")):
        raise typer.Exit(1)


# --------------------------------------------------------------------------- platform stand-in


@platform.command("migrate")
def platform_migrate() -> None:
    """Apply the stand-in's schema and create its stream."""
    from local_platform.serve import prepare

    _run(prepare(_settings()))
    typer.echo("platform schema and stream ready")


@platform.command("serve")
def platform_serve() -> None:
    """Run the stand-in's APIs, billing worker and outbox relay in the foreground."""
    from local_platform.serve import serve_forever
    from worker.telemetry import configure_logging

    configure_logging()
    asyncio.run(serve_forever(_settings()))


@platform.command("status")
def platform_status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The stand-in's health: its API and each background loop (exit 1 if a loop is failing or dead)."""
    from local_platform.health import fetch_health, render_health

    settings = _settings()
    code, body = _run(fetch_health(settings.resolved_billing_api_url(), settings.http_timeout_seconds))
    typer.echo(json.dumps(body, indent=2) if as_json else render_health(body))
    raise typer.Exit(0 if code == 200 else 1)


@app.command("ui-check")
def ui_check(
    out: Annotated[Path, typer.Option(help="where to save the screenshot")] = Path("docs/ui-remediation.png"),
) -> None:
    """Open the newest finished remediation in the real Temporal UI (headless Chromium) and screenshot it."""
    from starters.ui_check import UiCheckError
    from starters.ui_check import ui_check as check

    settings = _settings()

    async def go() -> tuple[str, Path]:
        return await check(await _client(settings), settings, out)

    try:
        url, path = _run(go())
    except UiCheckError as err:
        _fail(str(err), 1)
    typer.echo(f"{url}\nscreenshot: {path}")


@app.command("codec-server")
def codec_server(
    port: Annotated[int | None, typer.Option(help="port to listen on (default CODEC_PORT)")] = None,
    host: Annotated[str | None, typer.Option(help="address to bind (default CODEC_HOST)")] = None,
) -> None:
    """Serve /decode (and, if allowed, /encode) so the Temporal UI shows encrypted payloads to who may read them."""
    import uvicorn

    from worker.codec_auth import CodecAuth, CodecConfigError, check_config
    from worker.codec_server import codec_app
    from worker.payload_codec import EncryptionCodec, PayloadKeyError, payload_keys
    from worker.telemetry import configure_logging

    settings = _settings()
    host = host or settings.codec_host
    port = port or settings.codec_port
    try:
        keys = payload_keys(settings)
        warnings = check_config(settings, host)
    except (PayloadKeyError, CodecConfigError) as err:
        _fail(str(err))
    if not keys:
        _fail("PAYLOAD_ENCRYPTION is off: there is nothing to decode")
    configure_logging()  # the audit lines: one JSON object per decode on stderr
    app_ = codec_app(
        EncryptionCodec(keys or []),
        [settings.resolved_ui_url()],
        CodecAuth(settings),
        namespaces=settings.resolved_codec_namespaces(),
        max_body_bytes=settings.codec_max_body_bytes,
    )
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(
        f"codec server on http://{host}:{port} (UI origin {settings.resolved_ui_url()}, "
        f"namespaces {', '.join(settings.resolved_codec_namespaces())}, encode {settings.codec_encode})"
    )
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@platform.command("seed")
def platform_seed(
    orgs: int = 5,
    allocations: int = 100,
    seed: int = 7,
    prefix: str = "t",
    inject: Annotated[
        str, typer.Option(help="missing_open=a,orphan_open=b,unbilled_closed=c,payment_drift=d")
    ] = "",
) -> None:
    """Build a consistent platform and inject exactly the requested drift; prints what it injected."""
    from local_platform.seeder import SeedSpec, parse_inject

    try:
        spec = SeedSpec(
            orgs=orgs, allocations=allocations, seed=seed, prefix=prefix, inject=parse_inject(inject)
        )
    except ValueError as err:
        _fail(str(err))
    typer.echo(json.dumps(_run(_seed(_settings(), spec))))


async def _seed(settings: Settings, spec: Any) -> dict[str, Any]:
    from local_platform.seeder import seed
    from local_platform.serve import platform_connections
    from starters.operations import OperationError

    async with platform_connections(settings) as (conn, nc):
        try:
            report = await seed(conn, spec, nc)
        except ValueError as err:
            raise OperationError(str(err)) from None
    return report.as_dict()


@platform.command("incident")
def platform_incident(name: str, prefix: str = "inc") -> None:
    """Reproduce a runbook trigger: worker-crash, payments-reconcile, user-dispute, prepaid-depleted."""
    from local_platform.incidents import INCIDENTS

    if name not in INCIDENTS:
        _fail(f"unknown incident {name!r}; expected one of {', '.join(INCIDENTS)}")
    typer.echo(json.dumps(_run(_incident(_settings(), name, prefix))))


async def _incident(settings: Settings, name: str, prefix: str) -> dict[str, Any]:
    from local_platform.incidents import run_incident
    from local_platform.serve import platform_connections
    from starters.operations import OperationError

    async with platform_connections(settings) as (conn, nc):
        try:
            report = await run_incident(name, conn, nc, prefix=prefix)
        except ValueError as err:
            raise OperationError(str(err)) from None
    return report.as_dict()


# --------------------------------------------------------------------------- worker and remediations


@app.command()
def worker() -> None:
    """Run the remediation worker (until SIGTERM)."""
    from worker.main import run_worker
    from worker.telemetry import configure_logging, configure_tracing

    settings = _settings()
    configure_logging()
    configure_tracing("billing-remediation-worker", settings.otlp_endpoint)
    _run(run_worker(settings))


@alerts.command("serve")
def alerts_serve() -> None:
    """Receive Alertmanager webhooks (POST /alertmanager) and payments.reconcile_failed events."""
    from alert_intake.mapping import MappingError
    from alert_intake.serve import serve_forever
    from worker.telemetry import configure_logging, configure_tracing

    settings = _settings()
    configure_logging()
    configure_tracing("billing-remediation-alert-intake", settings.otlp_endpoint)
    try:
        _run(serve_forever(settings))
    except (MappingError, ValueError) as err:
        _fail(str(err))


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
    trigger: Annotated[str, typer.Option("--trigger", help=", ".join(t.value for t in Trigger))] = "manual",
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
    wait: Annotated[bool, typer.Option("--wait")] = False,
    requested_by: Annotated[str, typer.Option("--as", help="who starts it (audited)")] = "incident-commander",
) -> None:
    """Start a remediation (or attach to the one running for the same scope)."""
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
        _invalid(err)
    settings = _settings()
    started = _run(start_checked(settings, request, wait))
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
    from workflows.models import LaunchGuardVerifyRequest

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
        _invalid(err)
    settings = _settings()

    async def go() -> tuple[str, Any]:
        from starters import operations

        return await operations.verify_launch_guard(await _client(settings), settings, request)

    workflow_id, report = _run(go())
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
    from starters import operations

    await operations.preflight(settings, request)
    client = await _client(settings)
    started = await operations.start(client, settings, request)
    result = ""
    if wait:
        from workflows.models import RemediationResult

        outcome = await client.get_workflow_handle(
            started.workflow_id, result_type=RemediationResult
        ).result()
        result = f"outcome: {outcome.outcome.value}"
    return started, result


@app.command()
def status(workflow_id: str) -> None:
    """Phase, findings by kind, plan totals, approvals, verdict."""
    from starters import operations
    from starters.render import render_status

    settings = _settings()

    async def go() -> str:
        view = await operations.status(await _client(settings), workflow_id)
        return render_status(workflow_id, view)

    typer.echo(_run(go()))


@app.command()
def plan(workflow_id: str, limit: int = 50) -> None:
    """The plan awaiting approval and its first actions."""
    from starters import operations

    settings = _settings()

    async def go() -> str:
        summary = await operations.plan(await _client(settings), workflow_id)
        if summary is None:
            return "no plan yet"
        actions = await operations.plan_actions(settings, summary.plan_id, limit)
        lines = [
            f"plan {summary.plan_id} hash {summary.plan_hash}",
            f"{summary.action_count} actions, debits "
            f"{summary.debit_total_minor}, credits {summary.credit_total_minor} (minor units)",
        ]
        lines += [
            f"  {a['seq']:>5} {a['kind']:<28} {a['entity_type']}:{a['entity_id']:<24} {a['amount_minor']:>10}"
            f"  {a['idempotency_key']}"
            for a in actions
        ]
        return "\n".join(lines)

    typer.echo(_run(go()))


def _decide(
    workflow_id: str, plan_hash: str, approver: str, comment: str, decision: str, key: Path | None
) -> None:
    from starters import operations

    settings = _settings()

    async def go() -> str:
        return await operations.decide_plan(
            await _client(settings),
            settings,
            workflow_id,
            plan_hash=plan_hash,
            approver=approver,
            decision=decision,
            comment=comment,
            key_path=key,
        )

    typer.echo(_run(go()))


KeyOption = Annotated[
    Path | None,
    typer.Option("--key", help="the approver's private key (default: APPROVER_KEYS_DIR/NAME.key)"),
]


@keys.command("new")
def keys_new(
    name: Annotated[str, typer.Argument(help="the approver's name, as in APPROVERS")],
    directory: Annotated[Path | None, typer.Option("--dir", help="default: APPROVER_KEYS_DIR")] = None,
    overwrite: bool = False,
) -> None:
    """Make an Ed25519 key pair for an approver and print the public key for APPROVERS."""
    from config.approver_keys import ApproverKeyError, new_key_pair

    settings = _settings()
    try:
        path, public = new_key_pair(directory or settings.resolved_keys_dir(), name, overwrite=overwrite)
    except ApproverKeyError as err:
        _fail(str(err))
    typer.echo(f"private key: {path} (keep it on this machine, mode 0600)")
    typer.echo(f"public key:  {public}")
    typer.echo(f'APPROVERS entry: {{"name": "{name}", "public_key": "{public}"}}')


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
        _fail("choice must be 'retry' or 'hand_off'")
    from starters import operations

    settings = _settings()

    async def go() -> str:
        return await operations.decide_verdict(
            await _client(settings), workflow_id, actor=actor, choice=choice, comment=comment
        )

    typer.echo(_run(go()))


@app.command()
def abort(workflow_id: str) -> None:
    """Cancel a remediation (the freeze is lifted and evidence captured)."""
    from starters import operations

    settings = _settings()

    async def go() -> None:
        await operations.abort(await _client(settings), workflow_id)

    _run(go())
    typer.echo(f"cancellation requested for {workflow_id}")


@app.command("list")
def list_(
    phase: Annotated[str | None, typer.Option("--phase")] = None,
    org: Annotated[str | None, typer.Option("--org")] = None,
    correlation_id: Annotated[str | None, typer.Option("--correlation-id")] = None,
) -> None:
    """Remediations, filtered by the custom search attributes."""
    from starters import operations

    settings = _settings()

    async def go() -> list[dict[str, Any]]:
        query = operations.list_query(phase=phase, org=org, correlation_id=correlation_id)
        return await operations.list_runs(await _client(settings), query)

    for row in _run(go()):
        typer.echo(
            f"{row['workflow_id']:<50} {row['status']:<11} {row['phase'] or '-':<20} "
            f"{row['org'] or '-':<14} {row['correlation_id'] or '-'}"
        )


@app.command()
def evidence(workflow_id: str, format: Annotated[str, typer.Option("--format")] = "markdown") -> None:
    """The evidence pack of the latest run: markdown, json (docs/schemas/evidence.schema.json) or html."""
    from starters import operations
    from starters.render import render_evidence_html, render_evidence_markdown

    renderers = {
        "markdown": render_evidence_markdown,
        "json": lambda doc: json.dumps(doc, indent=2),
        "html": render_evidence_html,
    }
    if format not in renderers:
        _fail("--format must be markdown, json or html")
    doc = _run(operations.evidence(_settings(), workflow_id))
    typer.echo(renderers[format](doc))


@app.command()
def demo() -> None:
    """The `make demo` scenario: incident, remediation, approval, verdict, evidence."""
    from starters.demo import run_demo

    sys.exit(_run(run_demo(_settings())))


def main() -> None:
    """Console-script entry point: closes what the command opened, then exits with its code.

    Temporal's client runs Rust threads that cannot be closed from Python; left alive into interpreter
    finalization they sometimes abort a finished command with exit 134 (`PyGILState_Release: thread
    state ... must be current`, temporalio/sdk-python#300). So after the command's own clean-up the
    process ends without finalization.
    """
    code = 0
    try:
        app()
    except SystemExit as done:
        code = exit_code(done.code)
    except BaseException:  # an unexpected crash still reports and exits through the same door
        traceback.print_exc()
        code = 1
    finally:
        close_process_resources()
    os._exit(code)


def exit_code(value: object) -> int:
    """The process exit code for a ``SystemExit`` value (None is success; text is printed, then 1)."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def close_process_resources() -> None:
    """Flush and shut down what outlives a command: span exporter, log handlers, standard streams."""
    from worker.telemetry import shutdown_tracing

    shutdown_tracing()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


if __name__ == "__main__":
    main()
