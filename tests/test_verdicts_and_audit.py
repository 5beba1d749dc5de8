"""Verdicts and audit that cannot be fooled (issue 25), on the real servers.

Each test reproduces one hole an independent check found: a poison-message loop judged "stable", a stale
platform summary reported as consistent, a rollback outside the signed hash, a pack without most of the
diagnosis, rows appended after the seal, a refused approval audited with the wrong plan, a handed-over
alert restarting remediations, a token in a world-readable log, ports in the ephemeral range.
"""

from __future__ import annotations

import asyncio

import pytest

from activities.nats_jetstream import NatsActivities
from contracts.models import ConsumerSample, RunRef
from local_platform.events import publish
from tests.conftest import World
from tests.helpers import eventually
from workflows.criteria import worker_criterion

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _nats_activities(world: World) -> NatsActivities:
    return NatsActivities(
        world.settings.resolved_nats_url(),
        world.settings.billing_stream,
        world.settings.billing_consumer,
        world.settings.consumer_pending_threshold,
    )


async def test_a_poison_message_loop_is_not_stable_processing(world: World) -> None:
    """The worker delivers every event and acknowledges none: 'pending' falls to 0, the verdict fails."""
    nats_acts = _nats_activities(world)
    ref = RunRef(run_id="r", workflow_id="w", correlation_id="poison")
    threshold = world.settings.consumer_pending_threshold

    async def sample() -> ConsumerSample:
        taken = ConsumerSample.of(await nats_acts.check_consumer(ref))
        assert taken is not None
        return taken

    try:
        await world.db.execute("UPDATE billing.worker_control SET mode = 'poisoned'")
        for i in range(threshold * 2):
            await publish(world.nc, "provisioning.active", "poison", "", allocation_id=f"poison-{i}")
        await world.nc.flush()

        async def looping() -> tuple[ConsumerSample, ConsumerSample] | None:
            # A window in which everything was delivered (nothing undelivered, the old proxy's "0")
            # and the worker is redelivering: the shape the issue reported.
            start = await sample()
            await asyncio.sleep(1.5)
            end = await sample()
            delivered = end.pending == 0 and end.ack_pending > threshold
            return (start, end) if delivered and end.redelivered > 0 else None

        first, second = await eventually(looping, timeout=60, what="the worker to loop on poison messages")
        # Our own reading of the consumer, independent of the product's adapter.
        info = await world.nc.jetstream().consumer_info(
            world.settings.billing_stream, world.settings.billing_consumer
        )
        assert (info.num_ack_pending or 0) > threshold and (info.num_redelivered or 0) > 0
        assert second.pending <= threshold  # the undelivered count alone would have passed it
        verdict = worker_criterion(first, second, threshold)
        assert not verdict.passed, verdict
        assert f"unacknowledged {first.ack_pending} -> {second.ack_pending}" in verdict.detail
        assert f"redelivered {first.redelivered} -> {second.redelivered}" in verdict.detail
        assert "redeliver" in verdict.detail.split(":")[0]

        # Fixed, the worker acknowledges the backlog: the ack floor passes what was queued at the start.
        await world.db.execute("UPDATE billing.worker_control SET mode = 'running'")
        start = await sample()
        assert start.backlog_head > start.ack_floor

        async def recovered() -> str | None:
            verdict = worker_criterion(start, await sample(), threshold)
            return verdict.detail if verdict.passed else None

        detail = await eventually(recovered, timeout=60, what="the fixed worker to acknowledge the backlog")
        assert "redelivered" in detail and "unacknowledged" in detail
    finally:
        await world.db.execute("UPDATE billing.worker_control SET mode = 'running'")
        await nats_acts.close()


def test_a_backlog_under_the_threshold_still_fails_while_redeliveries_rise() -> None:
    """Few poison messages stay under the threshold; their rising redeliveries fail the window."""
    first = ConsumerSample(pending=0, ack_pending=5, ack_floor=10, backlog_head=15, redelivered=2,
                           seconds_since_active=1, status="warn")  # fmt: skip
    rising = first.model_copy(update={"redelivered": 5})
    verdict = worker_criterion(first, rising, threshold=100)
    assert not verdict.passed and "redeliveries rising" in verdict.detail and "(+3)" in verdict.detail
    left = first.model_copy(update={"redelivered": 2})
    verdict = worker_criterion(first, left, threshold=100)
    assert not verdict.passed and "2 messages redelivered and still unacknowledged" in verdict.detail
    # The same window with the floor past the start's backlog and nothing redelivered passes.
    drained = first.model_copy(update={"ack_pending": 0, "ack_floor": 15, "redelivered": 0})
    assert worker_criterion(first.model_copy(update={"redelivered": 0}), drained, threshold=100).passed


def test_default_ports_stay_below_the_ephemeral_range() -> None:
    """Every embedded default port is below 32768 and none is a well-known service's port."""
    from config import Settings

    ports = {
        name: field.default
        for name, field in Settings.model_fields.items()
        if name.endswith("_port") and isinstance(field.default, int) and field.default
    }
    assert {"postgres_port", "nats_port"} <= set(ports)
    well_known = {22, 25, 53, 80, 443, 3000, 3306, 4222, 5432, 5672, 6379, 8080, 8443, 9090, 9093, 9100, 9200}
    for name, port in ports.items():
        assert 1024 < port < 32768, f"{name}={port} is in the ephemeral range or privileged"
        assert port not in well_known, f"{name}={port} is a usual service port"
    assert len(set(ports.values())) == len(ports), f"two defaults share a port: {ports}"
