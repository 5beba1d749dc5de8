"""Long-running loops that never die silently: restarted with backoff, every failure logged, health reported.

A consumer loop that ends inside ``asyncio.gather`` stops work for good while the process looks alive
(issue 20: the stand-in's billing worker died on a fetch against a re-created consumer). Every
long-running loop (the stand-in's worker and outbox relay, the alert intake's subscriber) runs under
``supervise``: the loop's body is started again after any error, the reason is logged at each failure
and each restart, and ``LoopHealth`` says what the loop is doing for health endpoints and status commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

log = logging.getLogger("billing_remediation.loops")

LoopState = Literal["starting", "running", "restarting", "stopped", "dead"]
MAX_REASON = 300  # characters of an error kept in health and log lines


class LoopExited(RuntimeError):
    """A loop body returned although nobody asked it to stop."""


@dataclass
class LoopHealth:
    """What one supervised loop is doing, for health endpoints and status commands."""

    name: str
    state: LoopState = "starting"
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    last_progress_at: float | None = None

    def progress(self) -> None:
        """The body made a round (a fetch returned, a batch was published): it is alive."""
        self.last_progress_at = time.time()
        self.state = "running"

    @property
    def healthy(self) -> bool:
        """False while the loop is failing or after it died."""
        return self.state in ("starting", "running", "stopped")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "state": self.state,
            "healthy": self.healthy,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "last_progress_at": self.last_progress_at,
        }


class Connection(Protocol):
    """What ``require_connected`` needs of a client (nats-py's ``Client`` has it)."""

    @property
    def is_connected(self) -> bool: ...


def require_connected(client: Connection, what: str) -> None:
    """Fail the loop's life while its client is disconnected: a fetch that times out then is not progress."""
    if not client.is_connected:
        raise ConnectionError(f"{what} is disconnected (reconnecting)")


async def pull(sub: Any, client: Connection, health: LoopHealth, *, batch: int = 50) -> list[Any]:
    """One JetStream pull for a supervised consumer loop: the messages, or none when the pull idled.

    A disconnected client fails the loop's life (its idle pulls would otherwise look like progress);
    an idle pull counts as progress (nats-py raises either its own or the builtin TimeoutError).
    """
    require_connected(client, "NATS")
    try:
        msgs: list[Any] = await sub.fetch(batch, timeout=1)
    except TimeoutError:
        msgs = []
    health.progress()
    return msgs


def health_report(loops: dict[str, LoopHealth]) -> tuple[bool, dict[str, Any]]:
    """Whether every loop is healthy, and each loop's health by name (for a /healthz body)."""
    return all(loop.healthy for loop in loops.values()), {n: loop.as_dict() for n, loop in loops.items()}


def describe(exc: BaseException) -> str:
    """An error in one line: its type and message, cut to MAX_REASON characters."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` unless ``stop`` is set first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


FailureHook = Callable[[LoopHealth, BaseException], Awaitable[None]]


async def supervise(
    health: LoopHealth,
    body: Callable[[LoopHealth], Awaitable[None]],
    stop: asyncio.Event,
    *,
    on_failure: FailureHook | None = None,
    initial_backoff: float = 0.5,
    max_backoff: float = 15.0,
    healthy_after: float = 60.0,
) -> None:
    """Run ``body`` until ``stop`` is set, restarting it after any error with exponential backoff.

    A body that returns while ``stop`` is unset counts as a failure. The backoff starts again from
    ``initial_backoff`` once a body has run ``healthy_after`` seconds. Cancellation propagates.
    """
    backoff = initial_backoff
    while not stop.is_set():
        started = time.monotonic()
        try:
            await body(health)
            if stop.is_set():
                break
            raise LoopExited(f"{health.name} returned without being asked to stop")
        except asyncio.CancelledError:
            health.state = "stopped"
            raise
        except Exception as exc:
            if time.monotonic() - started >= healthy_after:
                backoff = initial_backoff
            reason = describe(exc)
            health.restarts += 1
            health.state = "restarting"
            health.last_error, health.last_error_at = reason, time.time()
            log.error(
                "%s failed: %s; restart %d in %.1f s",
                health.name,
                reason,
                health.restarts,
                backoff,
                extra={"fields": {"loop": health.name, "restarts": health.restarts}},
            )
            if on_failure is not None:
                try:
                    await on_failure(health, exc)
                except Exception as hook_err:  # the hook reports; it must not end the loop
                    log.warning("%s: failure hook failed: %s", health.name, describe(hook_err))
            await sleep_or_stop(stop, backoff)
            backoff = min(backoff * 2, max_backoff)
            if not stop.is_set():
                log.warning(
                    "%s restarting (restart %d) after: %s",
                    health.name,
                    health.restarts,
                    reason,
                    extra={"fields": {"loop": health.name, "restarts": health.restarts}},
                )
    health.state = "stopped"


def start_supervised(
    health: LoopHealth,
    body: Callable[[LoopHealth], Awaitable[None]],
    stop: asyncio.Event,
    **options: Any,
) -> asyncio.Task[None]:
    """``supervise`` as a task; should the task itself ever end early, the loop is marked dead and logged."""

    def ended(task: asyncio.Task[None]) -> None:
        if task.cancelled() or stop.is_set():
            return
        error = task.exception()
        health.state = "dead"
        health.last_error = describe(error) if error else "supervisor returned"
        health.last_error_at = time.time()
        log.critical("%s is dead: %s", health.name, health.last_error)

    task = asyncio.create_task(supervise(health, body, stop, **options), name=health.name)
    task.add_done_callback(ended)
    return task
