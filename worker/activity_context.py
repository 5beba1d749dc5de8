"""Each activity's span tagged with the run's ids, and its start and end logged as JSON lines (worker only:
kept apart from ``worker.telemetry`` so a CLI command does not load the SDK's worker)."""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import trace
from temporalio import activity
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

from contracts.models import RunRef


class RemediationContext(Interceptor):
    """Tags each activity's span with the run's ids and logs its start and end as JSON lines."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        """Wrap activity execution."""
        return _ActivityContext(next)


class _ActivityContext(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        arg = input.args[0] if input.args else None
        ref = _run_ref(arg) if arg is not None else None
        span = trace.get_current_span()
        if ref is not None and span.is_recording():
            span.set_attribute("correlation_id", ref.correlation_id)
            span.set_attribute("workflow_id", ref.workflow_id)
            for field, value in ref.scope.model_dump().items():
                if value:
                    span.set_attribute(f"scope.{field}", value)
        extra: dict[str, Any] = {}
        if ref is not None:
            extra["correlation_id"] = ref.correlation_id
        actor = getattr(arg, "actor", None)
        if isinstance(actor, str):
            extra["actor"] = actor
        started = time.monotonic()
        info = activity.info()
        activity.logger.info("activity started (attempt %d)", info.attempt, extra=extra)
        try:
            result = await super().execute_activity(input)
        except BaseException as err:
            activity.logger.warning(
                "activity failed after %.2fs: %s", time.monotonic() - started, err, extra=extra
            )
            raise
        activity.logger.info("activity completed in %.2fs", time.monotonic() - started, extra=extra)
        return result


def _run_ref(arg: Any) -> RunRef | None:
    if isinstance(arg, RunRef):
        return arg
    ref = getattr(arg, "ref", None)
    if isinstance(ref, RunRef):
        return ref
    request = getattr(arg, "request", None)
    return _run_ref(request) if request is not None and request is not arg else None
