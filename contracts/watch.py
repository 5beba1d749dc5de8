"""The drift watch's boundary models: its configuration, a tick's request, steps and result."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from contracts.models import Frozen, Scope

WATCH_WORKFLOW_PREFIX = "drift-watch"


class WatchConfig(Frozen):
    """What `remediate watch enable` set: the schedule's interval, the full pass's, the settle time, the
    threshold to act, and the scope watched (global by default)."""

    watch_id: str = "global"
    scope: Scope = Field(default_factory=Scope)
    every_seconds: int = Field(default=60, ge=10)
    full_every_seconds: int = Field(default=86_400, ge=60)
    settle_seconds: int = Field(default=60, ge=0)
    # Findings in one scope below this are recorded and counted, not acted on.
    act_threshold: int = Field(default=1, ge=1)
    # Findings spanning at least this many orgs start one platform-wide remediation, not one per org.
    widespread_orgs: int = Field(default=5, ge=2)

    def schedule_id(self) -> str:
        """The Temporal Schedule running this watch."""
        return f"{WATCH_WORKFLOW_PREFIX}-{self.watch_id}"


class WatchTickRequest(Frozen):
    """Input of one tick: the watch's configuration; ``force_full`` from `watch run-now --full`."""

    config: WatchConfig
    force_full: bool = False


class PlanTick(Frozen):
    """Input of `plan_tick`: the request and the tick's id (its run's workflow id)."""

    request: WatchTickRequest
    tick_id: str


class TickRef(Frozen):
    """The tick every step records under."""

    tick_id: str
    watch_id: str
    mode: Literal["incremental", "full"]


class WorkerProgress(Frozen):
    """How far the billing worker's consumer got: keys with later events are still in flight."""

    ack_floor: int = 0
    pending: int = 0
    ack_pending: int = 0
    seconds_since_active: int | None = None


class CollectResult(Frozen):
    """What the watch's consumer delivered: events read, keys stored, the new watermark."""

    events_read: int
    keys_stored: int
    watermark_seq: int
    worker: WorkerProgress = Field(default_factory=WorkerProgress)


class CatchUp(Frozen):
    """The platform-wide watches a remediation brought up to the stream's end before planning from them."""

    watches: list[str] = Field(default_factory=list)
    events_read: int = 0


class PassResult(Frozen):
    """One pass's outcome: keys checked, keys deferred (and why), findings by kind."""

    keys_checked: int
    keys_deferred: int = 0
    deferred_why: str = ""
    findings: dict[str, int] = Field(default_factory=dict)

    @property
    def total(self) -> int:
        """Findings of every kind."""
        return sum(self.findings.values())


class CheckRequest(Frozen):
    """Input of a pass: the tick, the watch's configuration, the billing worker's progress."""

    tick: TickRef
    config: WatchConfig
    worker: WorkerProgress = Field(default_factory=WorkerProgress)


class Acted(Frozen):
    """A remediation the tick started or joined; or findings it only recorded (below the threshold), or
    left with the payments team a remediation handed them to (handed_over)."""

    scope: str
    findings: int
    action: Literal["started", "joined", "recorded", "handed_over"]
    workflow_id: str | None = None


class ActRequest(Frozen):
    """Input of `act_on_drift`: the tick whose findings to act on, and the watch's thresholds."""

    tick: TickRef
    config: WatchConfig


class WatchTickResult(Frozen):
    """A tick as the Temporal UI shows it: what it looked at, what it found, what it started or joined."""

    tick_id: str
    mode: Literal["incremental", "full"]
    events_read: int = 0
    watermark_seq: int = 0
    keys_checked: int = 0
    keys_deferred: int = 0
    deferred_why: str = ""
    findings: dict[str, int] = Field(default_factory=dict)
    acted: list[Acted] = Field(default_factory=list)

    def markdown(self) -> str:
        """What the Temporal UI's details show for the tick."""
        found = ", ".join(f"{k}={v}" for k, v in self.findings.items() if v) or "none"
        lines = [
            f"**Drift watch tick ({self.mode})**",
            f"- Looked at: {self.events_read} events (watermark stream seq {self.watermark_seq}),"
            f" {self.keys_checked} keys checked" + (" (the whole scope)" if self.mode == "full" else ""),
            f"- Deferred: {self.keys_deferred}" + (f" ({self.deferred_why})" if self.deferred_why else ""),
            f"- Found: {found}",
        ]
        lines += [
            f"- {a.action} {a.workflow_id + ' ' if a.workflow_id else ''}for {a.scope}: {a.findings} findings"
            for a in self.acted
        ]
        return "\n".join(lines)


class FinishTick(Frozen):
    """Input of `finish_tick`: how the tick ended."""

    tick: TickRef
    outcome: Literal["ok", "failed"]
    error: str | None = None
    result: WatchTickResult | None = None
