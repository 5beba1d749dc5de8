"""Is the billing worker's failure a runtime regression of its current revision? Admin API + Loki.

Suspected when the worker's failing lines all began after the current revision rolled out (the hour
before it was quiet) and the ones that name a version name that revision; then rolling back to the previous revision is the fix, not a
restart (a restart runs the same bad code again).
"""

from __future__ import annotations

import time
from datetime import datetime

from temporalio import activity

from activities.billing_api import BillingApiActivities
from activities.loki import LokiActivities, line_field
from contracts import names
from contracts.models import CheckResult, RunRef

QUIET_BEFORE_NS = 3600 * 1_000_000_000
FAILING_LINES = '{service_name="gpuaas-billing-worker"} | json | __error__="" | level="error"'


class WorkerRegressionActivities:
    """Compares the worker's deployment history with where its failures come from."""

    def __init__(self, api: BillingApiActivities, loki: LokiActivities) -> None:
        self._api = api
        self._loki = loki

    @activity.defn(name=names.CHECK_WORKER_REGRESSION)
    async def check_worker_regression(self, ref: RunRef) -> CheckResult:
        """`critical` with ``rollback_to`` when the current revision's rollout explains the failures."""
        deployments = await self._api.read_worker_deployments(ref)
        current, previous = deployments.current, deployments.previous
        rollout_ns = _ns(current.rolled_out_at)
        # From an hour before the rollout: failures already going on then are not the new revision's.
        entries, _ = await self._loki.query_range(FAILING_LINES, rollout_ns - QUIET_BEFORE_NS, time.time_ns())
        versions = [line_field(line, "version") for _, _, line in entries]
        first_ns = min((ts for _, ts, _ in entries), default=None)
        from_current = sum(1 for v in versions if v == current.version)
        from_others = sum(1 for v in versions if v is not None and v != current.version)
        counts = {
            "current_revision": current.revision,
            "failing_lines": len(entries),
            "failing_lines_from_current": from_current,
        }
        if first_ns is None:
            return CheckResult(
                check="worker_regression", status="ok", headline="no failing worker lines", counts=counts
            )
        suspected = previous is not None and first_ns >= rollout_ns and from_current > 0 and from_others == 0
        if not suspected or previous is None:
            why = (
                "no earlier revision to roll back to"
                if previous is None
                else f"failures began {_ago(first_ns, rollout_ns)} {current.version}'s rollout; "
                f"{from_current} of {len(entries)} failing lines name it"
            )
            return CheckResult(
                check="worker_regression",
                status="ok",
                headline=f"no runtime regression: {why}",
                counts=counts,
            )
        counts["rollback_to"] = previous.revision
        return CheckResult(
            check="worker_regression",
            status="critical",
            headline=(
                f"runtime regression suspected: failures began {_ago(first_ns, rollout_ns)} {current.version}"
                f" (revision {current.revision}) rolled out; {from_current} failing lines, all from"
                f" {current.version}; roll back to {previous.version} (revision {previous.revision})"
            ),
            counts=counts,
        )


def _ns(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000_000)


def _ago(first_ns: int, rollout_ns: int) -> str:
    """``4 min after`` / ``29 days before``: how the first failure relates to the rollout."""
    seconds = abs(first_ns - rollout_ns) // 1_000_000_000
    amount = f"{seconds} s"
    for unit, size in (("days", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            amount = f"{seconds // size} {unit}"
            break
    return f"{amount} {'after' if first_ns >= rollout_ns else 'before'}"
