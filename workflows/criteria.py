"""Recovery criteria computed from observations (pure: no I/O, replay-safe)."""

from __future__ import annotations

from contracts.models import ConsumerSample, Criterion


def worker_criterion(
    first: ConsumerSample | None, second: ConsumerSample | None, threshold: int
) -> Criterion:
    """Stable processing means progress: the backlog ends under the threshold (and is not stuck there),
    or it falls while the ack floor advances. A backlog that stays or grows without acks fails."""
    name = "billing_worker_stable"
    if first is None or second is None:
        return Criterion(name=name, passed=False, detail="unknown: the NATS consumer could not be read")
    acked = second.ack_floor - first.ack_floor
    numbers = (
        f"pending {first.pending} -> {second.pending}, ack floor {first.ack_floor} -> {second.ack_floor}"
        f" (+{acked}), threshold {threshold}, consumer status {second.status}"
    )
    stuck = second.pending > 0 and acked <= 0 and second.status == "critical"
    if second.pending <= threshold and not stuck:
        return Criterion(name=name, passed=True, detail=f"backlog under the threshold: {numbers}")
    if second.pending < first.pending and acked > 0:
        return Criterion(name=name, passed=True, detail=f"backlog falling while acks advance: {numbers}")
    return Criterion(name=name, passed=False, detail=f"no progress: {numbers}")
