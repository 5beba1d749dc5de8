"""Recovery criteria computed from observations (pure: no I/O, replay-safe)."""

from __future__ import annotations

from workflows.models import ConsumerSample, Criterion


def worker_criterion(first: ConsumerSample | None, second: ConsumerSample | None) -> Criterion:
    if first is None or second is None:
        return Criterion(name="billing_worker_stable", passed=False, detail="NATS consumer unreachable")
    steady = second.status in ("ok", "warn") and (second.pending <= first.pending or second.pending == 0)
    return Criterion(
        name="billing_worker_stable",
        passed=steady,
        detail=f"pending {first.pending} -> {second.pending}, consumer status {second.status}",
    )
