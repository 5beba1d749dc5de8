"""How workflows call activities: explicit timeouts, a bounded retry policy, the failure's cause in words."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

from contracts import names
from contracts.models import RuntimeOptions

A = TypeVar("A")
T = TypeVar("T")


def activity_cause(err: ActivityError) -> str:
    """The innermost failure message of an activity error, for findings and the UI."""
    return err.cause.message if isinstance(err.cause, ApplicationError) else str(err.cause or err)


def retry_policy(attempts: int, max_interval: int) -> RetryPolicy:
    """Exponential backoff from 1 s up to ``max_interval``; the project's non-retryable errors stop it."""
    return RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=max_interval),
        maximum_attempts=attempts,
        non_retryable_error_types=names.NON_RETRYABLE_ERRORS,
    )


def activity_options(
    options: RuntimeOptions | None, *, timeout: int | None, heartbeat: bool, attempts: int, summary: str
) -> dict[str, Any]:
    """Keyword arguments for ``workflow.execute_activity``.

    Short activities time out fast, so work held by a dead worker is retried elsewhere quickly; long
    ones heartbeat instead. Before the runtime options are loaded, conservative defaults apply.
    """
    short = options.activity_timeout_seconds if options else 60
    beat = options.heartbeat_seconds if options else 30
    return {
        "start_to_close_timeout": timedelta(seconds=timeout or short),
        "heartbeat_timeout": timedelta(seconds=beat) if heartbeat else None,
        "retry_policy": retry_policy(attempts, options.retry_max_interval_seconds if options else 30),
        "summary": summary[:200],
    }


async def run_activity(
    activity: Callable[[Any, A], Awaitable[T]],
    arg: A,
    summary: str,
    options: RuntimeOptions | None,
    *,
    timeout: int | None = None,
    heartbeat: bool = False,
    attempts: int = 5,
) -> T:
    """Execute an activity method (called by reference: mypy checks its argument and result) with
    explicit timeouts, a bounded retry policy and a UI summary; history records its stable name."""
    kwargs = activity_options(
        options, timeout=timeout, heartbeat=heartbeat, attempts=attempts, summary=summary
    )
    return await workflow.execute_activity_method(activity, arg, **kwargs)
