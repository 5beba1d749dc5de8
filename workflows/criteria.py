"""Recovery criteria computed from observations (pure: no I/O, replay-safe)."""

from __future__ import annotations

from contracts.models import CheckResult, ConsumerSample, Criterion, ReconcileSummary

NAMED_IN_DETAIL = 3  # left records named in the criterion's one-line detail (all named ones are in ``left``)


def worker_criterion(
    first: ConsumerSample | None, second: ConsumerSample | None, threshold: int
) -> Criterion:
    """Stable processing, judged on every number the consumer gives (never the undelivered count alone).

    It passes when the ack floor advanced past the backlog queued when the window opened, or when the
    whole backlog (undelivered + unacknowledged) ends under the threshold without being stuck there.
    Redeliveries that rise during the window fail it either way: a worker caught in a poison-message
    loop delivers everything and acknowledges nothing, so "pending" alone falls to 0 while nothing is
    billed.
    """
    name = "billing_worker_stable"
    if first is None or second is None:
        return Criterion(name=name, passed=False, detail="unknown: the NATS consumer could not be read")
    acked = second.ack_floor - first.ack_floor
    redelivered = second.redelivered - first.redelivered
    backlog = second.pending + second.ack_pending
    numbers = (
        f"undelivered {first.pending} -> {second.pending}, unacknowledged {first.ack_pending} ->"
        f" {second.ack_pending}, redelivered {first.redelivered} -> {second.redelivered} (+{redelivered}),"
        f" ack floor {first.ack_floor} -> {second.ack_floor} (+{acked}), backlog queued at the start"
        f" ends at stream seq {first.backlog_head}, threshold {threshold}, consumer status {second.status}"
    )
    # NATS counts messages redelivered and still unacknowledged (a gauge): rising, or left over while
    # the floor stays behind the start's backlog, is a worker failing on the same messages again.
    drained = acked > 0 and second.ack_floor >= first.backlog_head
    if redelivered > 0:
        return Criterion(name=name, passed=False, detail=f"redeliveries rising during the window: {numbers}")
    if second.redelivered > 0 and not drained:
        return Criterion(
            name=name,
            passed=False,
            detail=f"{second.redelivered} messages redelivered and still unacknowledged: {numbers}",
        )
    if drained:
        return Criterion(
            name=name,
            passed=True,
            detail=f"the ack floor passed the backlog queued at the start of the window: {numbers}",
        )
    stuck = backlog > 0 and acked <= 0 and second.status == "critical"
    if backlog <= threshold and not stuck:
        return Criterion(
            name=name,
            passed=True,
            detail=f"backlog (undelivered + unacknowledged) under the threshold: {numbers}",
        )
    return Criterion(name=name, passed=False, detail=f"no progress: {numbers}")


def consistency_after_reconcile(check: CheckResult, drift: dict[str, int]) -> CheckResult:
    """The data-consistency diagnosis once the run's own reconciliation has counted drift.

    A check that said "consistent" (from counts or a platform summary measured earlier) while the same
    run's reconciliation found drifted entities is re-stated as inconsistent, naming both: the run never
    reports its scope consistent while its own reconciliation says otherwise.
    """
    found = {kind: n for kind, n in drift.items() if n}
    if check.check != "data_consistency" or check.status != "ok" or not found:
        return check
    counts = ", ".join(f"{kind}={n}" for kind, n in found.items())
    return check.model_copy(
        update={
            "status": "warn",
            "headline": f"inconsistent: this run's reconciliation found {sum(found.values())} drifted"
            f" entities ({counts}); the check before it said: {check.headline}",
        }
    )


def drift_criterion(drift: ReconcileSummary) -> Criterion:
    """No drift left but what was handed to a human; when some is, the records left, each tied to the
    plan action meant to fix it and the reason that action was not applied."""
    unexplained = drift.total - drift.follow_ups
    detail = ", ".join(f"{k}={v}" for k, v in drift.counts.items())
    if drift.follow_ups:
        detail += f"; {drift.follow_ups} payment sessions handed to the payments team (follow-ups)"
    if unexplained and drift.left:
        named = "; ".join(e.describe() for e in drift.left[:NAMED_IN_DETAIL])
        more = unexplained - min(len(drift.left), NAMED_IN_DETAIL)
        detail += f". Left: {named}" + (f"; and {more} more" if more > 0 else "")
    return Criterion(name="no_unresolved_drift", passed=unexplained == 0, detail=detail, left=drift.left)
