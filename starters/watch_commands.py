"""`remediate watch`: the drift watch's schedule (enable, status, pause, resume, disable, run-now)."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Annotated

import typer

from starters.cli_app import app, cli_client, cli_settings, fail, run_async

if TYPE_CHECKING:
    from contracts.watch import WatchTickResult

watch = typer.Typer(help="The drift watch: find billing drift on a schedule, before a customer does.")
app.add_typer(watch, name="watch", no_args_is_help=True)

WatchId = Annotated[str, typer.Option("--watch", help="which watch (one schedule each)")]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
FLAGS = {
    "full_every_seconds": "--full-every",
    "every_seconds": "--every",
    "settle_seconds": "--settle",
    "act_threshold": "--act-threshold",
    "watch_id": "--watch",
    "org_id": "--org",
    "project_id": "--project",
    "user_id": "--user",
}


def seconds(text: str, what: str) -> int:
    """``90s``, ``1m``, ``24h``, ``7d`` (or plain seconds) as seconds; a clear error otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if match is None:
        fail(f"{what}: {text!r} is not a duration like 30s, 1m, 24h or 7d")
        raise AssertionError("unreachable")
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


@watch.command("enable")
def enable(
    every: Annotated[str, typer.Option("--every", help="how often a tick checks the changed keys")] = "1m",
    full_every: Annotated[str, typer.Option("--full-every", help="how often a tick is a full pass")] = "24h",
    settle: Annotated[str, typer.Option("--settle", help="how long a change may be in flight")] = "60s",
    act_threshold: Annotated[int, typer.Option("--act-threshold", help="findings per scope to act")] = 1,
    org: Annotated[str | None, typer.Option("--org")] = None,
    project: Annotated[str | None, typer.Option("--project")] = None,
    user: Annotated[str | None, typer.Option("--user")] = None,
    watch_id: WatchId = "global",
    actor: Annotated[str, typer.Option("--as", help="who enables it (in the schedule's note)")] = "operator",
    paused: Annotated[
        bool, typer.Option("--paused", help="create it paused (`watch resume` starts it)")
    ] = False,
) -> None:
    """Create (or reconfigure) the watch's Temporal Schedule."""
    from pydantic import ValidationError

    from contracts.models import Scope
    from contracts.watch import WatchConfig
    from remediation_client.watch import enable as enable_schedule

    try:
        config = WatchConfig(
            watch_id=watch_id,
            scope=Scope(org_id=org, project_id=project, user_id=user),
            every_seconds=seconds(every, "--every"),
            full_every_seconds=seconds(full_every, "--full-every"),
            settle_seconds=seconds(settle, "--settle"),
            act_threshold=act_threshold,
        )
    except ValidationError as err:
        from workflows.input_errors import explain

        # The rule in the flags' names the commander typed.
        message = explain(err)
        for field, flag in FLAGS.items():
            message = message.replace(field, flag)
        fail(message)
        raise AssertionError("unreachable") from None
    settings = cli_settings()

    async def go() -> str:
        return await enable_schedule(await cli_client(settings), settings, config, actor, paused=paused)

    schedule_id = run_async(go())
    typer.echo(
        f"drift watch {watch_id} enabled: schedule {schedule_id}, changed keys every {config.every_seconds} s,"
        f" full pass every {config.full_every_seconds} s, settle {config.settle_seconds} s,"
        f" acts from {config.act_threshold} finding(s) per scope ({config.scope.describe()})"
    )
    typer.echo(
        f"UI: {settings.resolved_ui_url()}/namespaces/{settings.temporal_namespace}/schedules/{schedule_id}"
    )


@watch.command("status")
def status(watch_id: WatchId = "global", as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The schedule, the last tick, the lag, what was found and what was started (exit 1 if the last tick failed)."""
    from remediation_client.watch import WatchStatus
    from remediation_client.watch import status as watch_status
    from starters.render import render_watch_status

    settings = cli_settings()

    async def go() -> WatchStatus:
        return await watch_status(await cli_client(settings), settings, watch_id)

    view = run_async(go())
    typer.echo(json.dumps(view.__dict__, default=str, indent=2) if as_json else render_watch_status(view))
    raise typer.Exit(1 if view.failures_in_a_row else 0)


def _change(watch_id: str, actor: str, done: str) -> None:
    """Pause, resume or disable the watch's schedule; say what was done."""
    from remediation_client import watch as schedule

    settings = cli_settings()

    async def go() -> None:
        client = await cli_client(settings)
        if done == "paused":
            await schedule.pause(client, watch_id, actor)
        elif done == "resumed":
            await schedule.resume(client, watch_id, actor)
        else:
            await schedule.disable(client, watch_id)

    run_async(go())
    typer.echo(f"drift watch {watch_id} {done}")


@watch.command("pause")
def pause(watch_id: WatchId = "global", actor: Annotated[str, typer.Option("--as")] = "operator") -> None:
    """Stop starting ticks (a running tick finishes)."""
    _change(watch_id, actor, "paused")


@watch.command("resume")
def resume(watch_id: WatchId = "global", actor: Annotated[str, typer.Option("--as")] = "operator") -> None:
    """Start ticking again."""
    _change(watch_id, actor, "resumed")


@watch.command("disable")
def disable(watch_id: WatchId = "global") -> None:
    """Delete the schedule (the ticks' records stay)."""
    _change(watch_id, "", "disabled")


@watch.command("run-now")
def run_now(
    watch_id: WatchId = "global", full: Annotated[bool, typer.Option("--full", help="a full pass")] = False
) -> None:
    """Run one tick now and print what it found and started."""
    from remediation_client.watch import run_now as run_tick

    settings = cli_settings()

    async def go() -> WatchTickResult:
        return await run_tick(await cli_client(settings), watch_id, full=full)

    typer.echo(run_async(go()).markdown())
