"""One tick of the drift watch: read what changed, check it (or everything, on a full pass), act on drift.

Started by the watch's Temporal Schedule (`remediate watch enable`); orchestration only. A tick that
fails records why and fails its run, so the schedule's recent actions, the metrics and `watch status`
show it; the next tick starts from the same watermark.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.postgres.watch import WatchDatabaseActivities
    from activities.watch_events import WatchEventActivities
    from activities.watch_starts import WatchStartActivities
    from contracts import names
    from contracts.watch import (
        Acted,
        ActRequest,
        CheckRequest,
        CollectResult,
        FinishTick,
        PassResult,
        PlanTick,
        TickRef,
        WatchTickRequest,
        WatchTickResult,
    )
    from workflows.activity_calls import activity_cause, run_activity

A = TypeVar("A")
T = TypeVar("T")
ATTEMPTS = 3  # a tick is retried by the next tick, not forever


@workflow.defn(name=names.DRIFT_WATCH_WORKFLOW)
class DriftWatchWorkflow:
    """Incremental (changed keys) or full reconciliation, then start-or-join per scope with drift."""

    def __init__(self) -> None:
        self._result: WatchTickResult | None = None

    @workflow.run
    async def run(self, request: WatchTickRequest) -> WatchTickResult:
        """Run one tick; its result is what the UI shows."""
        config = request.config
        tick: TickRef = await self._act(
            WatchDatabaseActivities.plan_tick,
            PlanTick(request=request, tick_id=workflow.info().workflow_id),
            "Decide incremental or full pass; record the tick",
        )
        try:
            collected: CollectResult = await self._act(
                WatchEventActivities.collect_changed_keys,
                tick,
                "Read the platform's events since the watermark; store the keys they name",
                timeout=300,
            )
            check = CheckRequest(tick=tick, config=config, worker=collected.worker)
            if tick.mode == "full":
                found: PassResult = await self._act(
                    WatchDatabaseActivities.full_pass,
                    check,
                    f"Full reconciliation of {config.scope.describe()} (every {config.full_every_seconds} s)",
                    timeout=1800,
                )
            else:
                found = await self._act(
                    WatchDatabaseActivities.check_changed_keys,
                    check,
                    f"Check the changed keys (settled {config.settle_seconds} s) with the runbook's four checks",
                    timeout=600,
                )
            acted: list[Acted] = []
            if found.total:
                acted = await self._act(
                    WatchStartActivities.act_on_drift,
                    ActRequest(tick=tick, config=config),
                    f"Start or join the remediation of each scope with drift ({found.total} findings)",
                )
        except ActivityError as err:
            cause = activity_cause(err)
            await self._act(
                WatchDatabaseActivities.finish_tick,
                FinishTick(tick=tick, outcome="failed", error=cause),
                "Record the failed tick",
            )
            raise ApplicationError(f"drift watch tick failed: {cause}", non_retryable=True) from err
        self._result = WatchTickResult(
            tick_id=tick.tick_id,
            mode=tick.mode,
            events_read=collected.events_read,
            watermark_seq=collected.watermark_seq,
            keys_checked=found.keys_checked,
            keys_deferred=found.keys_deferred,
            deferred_why=found.deferred_why,
            findings=found.findings,
            acted=acted,
        )
        await self._act(
            WatchDatabaseActivities.finish_tick,
            FinishTick(tick=tick, outcome="ok", result=self._result),
            "Record the tick",
        )
        workflow.set_current_details(self._result.markdown())
        return self._result

    @workflow.query(name=names.QUERY_STATUS)
    def status(self) -> WatchTickResult | None:
        """The tick's result once it has one."""
        return self._result

    async def _act(
        self, activity: Callable[[Any, A], Awaitable[T]], arg: A, summary: str, *, timeout: int = 120
    ) -> T:
        """A tick's step: a timeout and a few attempts (the next tick retries, not this one forever)."""
        return await run_activity(activity, arg, summary, None, timeout=timeout, attempts=ATTEMPTS)
