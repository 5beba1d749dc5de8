"""The drift watch's Temporal Schedule, managed from the CLI: enable, pause, resume, disable, run now, status."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleDescription,
    ScheduleHandle,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
    ScheduleUpdate,
    ScheduleUpdateInput,
    WorkflowFailureError,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from config import Settings
from contracts import names
from contracts.watch import WatchConfig, WatchTickRequest, WatchTickResult
from remediation_client.errors import OperationError, root_message


def _schedule(config: WatchConfig, settings: Settings, actor: str, paused: bool) -> Schedule:
    every = timedelta(seconds=config.every_seconds)
    return Schedule(
        action=ScheduleActionStartWorkflow(
            names.DRIFT_WATCH_WORKFLOW,
            WatchTickRequest(config=config),
            id=f"{config.schedule_id()}-tick",
            task_queue=settings.task_queue,
            static_summary=f"Drift watch of {config.scope.describe()}: changed keys every"
            f" {config.every_seconds} s, full pass every {config.full_every_seconds} s",
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
        # A slow tick is never doubled; a missed one is not replayed in a burst after an outage.
        policy=SchedulePolicy(
            overlap=ScheduleOverlapPolicy.SKIP, catchup_window=max(every, timedelta(minutes=1))
        ),
        state=ScheduleState(paused=paused, note=f"{'created paused' if paused else 'enabled'} by {actor}"),
    )


async def enable(
    client: Client, settings: Settings, config: WatchConfig, actor: str, *, paused: bool = False
) -> str:
    """Create the watch's schedule, or replace its configuration; returns the schedule id."""
    check_watch_id(config.watch_id)
    schedule = _schedule(config, settings, actor, paused)
    try:
        await client.create_schedule(config.schedule_id(), schedule)
    except ScheduleAlreadyRunningError:

        def replace(_: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        await client.get_schedule_handle(config.schedule_id()).update(replace)
    return config.schedule_id()


async def _described(client: Client, watch_id: str) -> tuple[ScheduleHandle, ScheduleDescription]:
    """The watch's schedule and its description (one call); a clear error when there is none."""
    check_watch_id(watch_id)
    handle = client.get_schedule_handle(WatchConfig(watch_id=watch_id).schedule_id())
    try:
        return handle, await handle.describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise OperationError(
                f"no drift watch {watch_id!r}: `remediate watch enable` creates it"
            ) from None
        raise


async def pause(client: Client, watch_id: str, actor: str) -> None:
    """Stop starting ticks (a running one finishes)."""
    await (await _described(client, watch_id))[0].pause(note=f"paused by {actor}")


async def resume(client: Client, watch_id: str, actor: str) -> None:
    """Start ticking again."""
    await (await _described(client, watch_id))[0].unpause(note=f"resumed by {actor}")


async def disable(client: Client, watch_id: str) -> None:
    """Delete the schedule (its ticks' records stay in Postgres)."""
    await (await _described(client, watch_id))[0].delete()


async def run_now(client: Client, watch_id: str, *, full: bool = False) -> WatchTickResult:
    """Run one tick now with the schedule's configuration (``full``: a full pass) and wait for it."""
    action = _tick_action((await _described(client, watch_id))[1], watch_id)
    config = await _config_of(client, action)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    tick = await client.start_workflow(
        names.DRIFT_WATCH_WORKFLOW,
        WatchTickRequest(config=config, force_full=full),
        id=f"{config.schedule_id()}-manual-{stamp}-{uuid.uuid4().hex[:6]}",
        task_queue=action.task_queue,
        result_type=WatchTickResult,
        static_summary=f"Drift watch: tick run now{' (full pass)' if full else ''}",
    )
    try:
        result: WatchTickResult = await tick.result()
    except WorkflowFailureError as err:
        # The tick's own words (which step, and the dependency's error), not only the innermost cause.
        cause = err.cause
        message = cause.message if isinstance(cause, ApplicationError) else root_message(err)
        raise OperationError(f"tick {tick.id} failed: {message}") from None
    return result


def _tick_action(description: ScheduleDescription, watch_id: str) -> ScheduleActionStartWorkflow:
    """The schedule's action, which must start drift watch ticks."""
    action = description.schedule.action
    if not isinstance(action, ScheduleActionStartWorkflow) or action.workflow != names.DRIFT_WATCH_WORKFLOW:
        raise OperationError(
            f"schedule of drift watch {watch_id!r} does not start {names.DRIFT_WATCH_WORKFLOW} ticks"
        )
    return action


async def _config_of(client: Client, action: ScheduleActionStartWorkflow) -> WatchConfig:
    """The watch's configuration, as the schedule's action carries it (raw payloads once described)."""
    args = list(action.args)
    if args and isinstance(args[0], WatchTickRequest):
        return args[0].config
    [request] = await client.data_converter.decode(args, [WatchTickRequest])
    return WatchTickRequest.model_validate(request).config


@dataclass
class WatchStatus:
    """What `remediate watch status` shows."""

    watch_id: str
    paused: bool
    note: str
    next_runs: list[datetime]
    config: WatchConfig | None
    last_tick: dict[str, Any] | None
    last_success_at: datetime | None
    lag_seconds: int | None
    failures_in_a_row: int
    recent: list[dict[str, Any]] = field(default_factory=list)


async def status(client: Client, settings: Settings, watch_id: str) -> WatchStatus:
    """The schedule's state and the watch's recent ticks from Postgres."""
    _, desc = await _described(client, watch_id)
    config = await _config_of(client, _tick_action(desc, watch_id))
    conn = await asyncpg.connect(settings.resolved_database_url())
    try:
        ticks = [
            dict(r)
            for r in await conn.fetch(
                """SELECT tick_id, mode, started_at, finished_at, outcome, error, events_read, keys_checked,
                          keys_deferred, deferred_why, findings::text AS findings, acted::text AS acted
                   FROM remediation.watch_ticks WHERE watch_id = $1 ORDER BY started_at DESC LIMIT 10""",
                watch_id,
            )
        ]
        last_ok = await conn.fetchval(
            "SELECT max(finished_at) FROM remediation.watch_ticks WHERE watch_id = $1 AND outcome = 'ok'",
            watch_id,
        )
    finally:
        await conn.close()
    failures = 0
    for tick in ticks:
        if tick["outcome"] != "failed":
            break
        failures += 1
    state = desc.schedule.state
    return WatchStatus(
        watch_id=watch_id,
        paused=state.paused,
        note=state.note or "",
        next_runs=list(desc.info.next_action_times[:3]),
        config=config,
        last_tick=ticks[0] if ticks else None,
        last_success_at=last_ok,
        lag_seconds=int((datetime.now(UTC) - last_ok).total_seconds()) if last_ok else None,
        failures_in_a_row=failures,
        recent=ticks,
    )


def check_watch_id(watch_id: str) -> str:
    """Refuse a malformed watch id before any call."""
    if not watch_id or not all(c.isalnum() or c in "-_" for c in watch_id) or len(watch_id) > 64:
        raise OperationError(f"malformed watch id {watch_id!r}: letters, digits, '-' and '_' (at most 64)")
    return watch_id
