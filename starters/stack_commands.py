"""`remediate` commands that run the stack: dev, deployment, platform stand-in, worker, alert intake,
codec server, keys, demo, ui-check."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from starters.cli_app import (
    alerts,
    app,
    approvals,
    cli_client,
    cli_settings,
    deployment,
    dev,
    fail,
    keys,
    need_embedded,
    platform,
    run_async,
)

if TYPE_CHECKING:
    from config import Settings
    from local_platform.seeder import SeedReport

# --------------------------------------------------------------------------- dev stack


@dev.command("up")
def dev_up(
    services: Annotated[bool, typer.Option(help="Also start the platform stand-in and the worker.")] = False,
) -> None:
    """Start Postgres, NATS and Temporal (skipping any configured as external)."""
    from devstack import StackError, up

    settings = cli_settings()
    try:
        for line in up(settings, services=services):
            typer.echo(line)
    except StackError as err:
        fail(str(err), 1)
    if settings.worker_versioning == "on" and settings.temporal_address is None:
        # The local stack's workers serve this checkout's build: new runs go to it.
        from worker.connection import connect_temporal
        from worker.deployment import set_current_version

        async def current() -> str:
            return await set_current_version(await connect_temporal(settings), settings)

        typer.echo(
            f"worker deployment {settings.worker_deployment_name}: build {run_async(current())} is current"
        )
    typer.echo(f"Temporal UI: {settings.resolved_ui_url()}")


@deployment.command("set-current")
def deployment_set_current(
    build: Annotated[str | None, typer.Option("--build-id", help="default: this package's version")] = None,
) -> None:
    """Send new remediations to ``build``; running ones finish on the build they started on."""
    from worker.deployment import set_current_version

    settings = cli_settings()

    async def go() -> str:
        return await set_current_version(await cli_client(settings), settings, build)

    typer.echo(f"deployment {settings.worker_deployment_name}: build {run_async(go())} is current")


@dev.command("down")
def dev_down(
    purge: Annotated[
        bool, typer.Option(help="Also delete the stack's data (databases, streams, keys).")
    ] = False,
) -> None:
    """Stop exactly the processes `dev up` started."""
    from devstack import down

    for line in down(cli_settings(), purge=purge):
        typer.echo(line)


@dev.command("status")
def dev_status() -> None:
    """Each component, its address and health."""
    from devstack import status

    rows = status(cli_settings())
    width = max(len(r.name) for r in rows)
    for row in rows:
        health = "healthy" if row.healthy else "DOWN"
        typer.echo(f"{row.name:<{width}} {health:<8} {row.address:<40} {row.detail}")
    if not all(r.healthy for r in rows if r.name in ("postgres", "nats", "temporal")):
        raise typer.Exit(1)


# --------------------------------------------------------------------------- platform stand-in


@platform.command("migrate")
def platform_migrate() -> None:
    """Apply the stand-in's schema and create its stream."""
    from local_platform.serve import prepare

    run_async(prepare(cli_settings()))
    typer.echo("platform schema and stream ready")


@platform.command("serve")
def platform_serve() -> None:
    """Run the stand-in's APIs, billing worker and outbox relay in the foreground."""
    from local_platform.serve import serve_forever
    from worker.telemetry import configure_logging

    configure_logging()
    asyncio.run(serve_forever(cli_settings()))


@platform.command("status")
def platform_status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The stand-in's health: its API and each background loop (exit 1 if a loop is failing or dead)."""
    from local_platform.health import fetch_health, render_health

    settings = cli_settings()
    code, body = run_async(fetch_health(settings.resolved_billing_api_url(), settings.http_timeout_seconds))
    typer.echo(json.dumps(body, indent=2) if as_json else render_health(body))
    raise typer.Exit(0 if code == 200 else 1)


@app.command("ui-check")
def ui_check(
    out: Annotated[Path, typer.Option(help="where to save the screenshot")] = Path("docs/ui-remediation.png"),
) -> None:
    """Open the newest finished remediation in the real Temporal UI (headless Chromium) and screenshot it."""
    from starters.ui_check import UiCheckError
    from starters.ui_check import ui_check as check

    settings = cli_settings()

    async def go() -> tuple[str, Path]:
        return await check(await cli_client(settings), settings, out)

    try:
        url, path = run_async(go())
    except UiCheckError as err:
        fail(str(err), 1)
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

    settings = cli_settings()
    host = host or settings.codec_host
    port = port or settings.codec_port
    try:
        keys = payload_keys(settings)
        warnings = check_config(settings, host)
    except (PayloadKeyError, CodecConfigError) as err:
        fail(str(err))
    if not keys:
        fail("PAYLOAD_ENCRYPTION is off: there is nothing to decode")
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
        str,
        typer.Option(
            help="missing_open=a,orphan_open=b,unbilled_closed=c,payment_drift=d (captured at the provider),"
            " payment_unpaid=e,payment_refunded=f,payment_amount_mismatch=g"
        ),
    ] = "",
    ids_file: Annotated[
        Path | None, typer.Option("--ids-file", help="write every injected id here (JSON by kind)")
    ] = None,
) -> None:
    """Build a consistent platform and inject exactly the requested drift; prints what it injected."""
    from local_platform.seeder import SeedSpec, parse_inject

    if ids_file is not None and not ids_file.parent.is_dir():
        fail(f"--ids-file: directory {ids_file.parent} does not exist")

    try:
        spec = SeedSpec(
            orgs=orgs, allocations=allocations, seed=seed, prefix=prefix, inject=parse_inject(inject)
        )
    except ValueError as err:
        fail(str(err))
    typer.echo(json.dumps(run_async(_seed(cli_settings(), spec)).summary(ids_file)))


async def _seed(settings: Settings, spec: Any) -> SeedReport:
    from local_platform.provider_payments import seeder_for
    from local_platform.seeder import seed
    from local_platform.serve import platform_connections
    from remediation_client import OperationError

    async with platform_connections(settings) as (conn, nc), seeder_for(settings) as provider:
        try:
            report = await seed(conn, spec, nc, provider)
        except ValueError as err:
            raise OperationError(str(err)) from None
    return report


@platform.command("incident")
def platform_incident(name: str, prefix: str = "inc") -> None:
    """Reproduce a runbook trigger: worker-crash, worker-regression, payments-reconcile, user-dispute, prepaid-depleted."""
    from local_platform.incidents import INCIDENTS

    if name not in INCIDENTS:
        fail(f"unknown incident {name!r}; expected one of {', '.join(INCIDENTS)}")
    typer.echo(json.dumps(run_async(_incident(cli_settings(), name, prefix))))


async def _incident(settings: Settings, name: str, prefix: str) -> dict[str, Any]:
    from local_platform.incidents import run_incident
    from local_platform.provider_payments import seeder_for
    from local_platform.serve import platform_connections
    from remediation_client import OperationError

    async with platform_connections(settings) as (conn, nc), seeder_for(settings) as provider:
        try:
            report = await run_incident(name, conn, nc, prefix=prefix, provider=provider)
        except ValueError as err:
            raise OperationError(str(err)) from None
    return report.as_dict()


# --------------------------------------------------------------------------- worker and remediations


@app.command()
def worker() -> None:
    """Run the remediation worker (until SIGTERM)."""
    from worker.main import run_worker
    from worker.telemetry import configure_logging, configure_tracing

    settings = cli_settings()
    configure_logging()
    configure_tracing("billing-remediation-worker", settings.otlp_endpoint)
    run_async(run_worker(settings))


@alerts.command("serve")
def alerts_serve() -> None:
    """Receive Alertmanager webhooks (POST /alertmanager) and payments.reconcile_failed events."""
    from alert_intake.mapping import MappingError
    from alert_intake.serve import serve_forever
    from worker.telemetry import configure_logging, configure_tracing

    settings = cli_settings()
    configure_logging()
    configure_tracing("billing-remediation-alert-intake", settings.otlp_endpoint)
    try:
        run_async(serve_forever(settings))
    except (MappingError, ValueError) as err:
        fail(str(err))


@approvals.command("serve")
def approvals_serve() -> None:
    """Serve the approval page (APPROVALS_HOST:APPROVALS_PORT; on a terminal, prints the link with its token)."""
    from approval_page.serve import serve_forever
    from worker.telemetry import configure_logging

    settings = cli_settings()
    configure_logging()
    link = settings.approvals_link(to_terminal=sys.stdout.isatty())
    if link is not None:
        typer.echo(f"approval page: {link}")
    try:
        run_async(serve_forever(settings))
    except ValueError as err:
        fail(str(err))


@keys.command("new")
def keys_new(
    name: Annotated[str, typer.Argument(help="the approver's name, as in APPROVERS")],
    directory: Annotated[Path | None, typer.Option("--dir", help="default: APPROVER_KEYS_DIR")] = None,
    overwrite: bool = False,
) -> None:
    """Make an Ed25519 key pair for an approver and print the public key for APPROVERS."""
    from config.approver_keys import ApproverKeyError, new_key_pair

    settings = cli_settings()
    try:
        path, public = new_key_pair(directory or settings.resolved_keys_dir(), name, overwrite=overwrite)
    except ApproverKeyError as err:
        fail(str(err))
    typer.echo(f"private key: {path} (keep it on this machine, mode 0600)")
    typer.echo(f"public key:  {public}")
    typer.echo(f'APPROVERS entry: {{"name": "{name}", "public_key": "{public}"}}')


@app.command()
def demo() -> None:
    """The `make demo` scenario: incident, remediation, approval, verdict, evidence."""
    need_embedded("demo")
    from starters.demo import run_demo

    sys.exit(run_async(run_demo(cli_settings())))
