"""The event-sequence diagnosis reads the stream's newest events, not its oldest.

A stream kept for weeks holds more than one scan reads; the incident is in its newest events. Read from
the start, the check looked only at the oldest ones and never saw the incident's.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from temporalio.testing import ActivityEnvironment

import activities.nats_jetstream as nats_activities
from activities.nats_jetstream import NatsActivities
from contracts.models import RunRef, Scope
from local_platform.events import publish_stored
from tests.conftest import World

LIMIT = 40


async def _event(world: World, subject: str, alloc: str) -> None:
    at = datetime.now(UTC).isoformat()
    await publish_stored(world.nc, subject, "seq-corr", "", allocation_id=alloc, org_id="seq-org", at=at)


async def test_the_check_reads_the_newest_events_and_says_which(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nats_activities, "SCAN_LIMIT", LIMIT)
    # Old history: an allocation activated long ago, then many unrelated events.
    await _event(world, "provisioning.active", "seq-old")
    for n in range(LIMIT):
        await _event(world, "provisioning.active", f"seq-filler-{n}")
    # The incident: the old allocation released, a new one released with no activation (a gap), and
    # one activated after its release (out of order).
    await _event(world, "provisioning.releasing.completed", "seq-old")
    await _event(world, "provisioning.releasing.completed", "seq-lost")
    await _event(world, "provisioning.releasing.completed", "seq-late")
    await _event(world, "provisioning.active", "seq-late")
    settings = world.settings
    check = NatsActivities(
        settings.resolved_nats_url(), settings.billing_stream, settings.billing_consumer, 100
    )
    ref = RunRef(run_id="r", workflow_id="remediation-x", correlation_id="seq-corr", scope=Scope())
    try:
        result = await ActivityEnvironment().run(check.read_event_sequence, ref)
        # A read cut short is judged on what arrived, says so, and is never "ok".
        monkeypatch.setattr(nats_activities, "SCAN_TIMEOUT", 0)
        cut = await ActivityEnvironment().run(check.read_event_sequence, ref)
    finally:
        await check.close()
    assert cut.status == "warn" and f"of {LIMIT} events arrived within 0 s" in cut.headline, cut.headline
    counts = result.counts
    assert counts["scanned"] == LIMIT and counts["last_seq"] - counts["first_seq"] == LIMIT - 1
    # The newest events were read: the reversed pair is found. Allocations whose first event in the window
    # is a release (the old one, the lost one and the reversed one: it cannot tell them apart) are
    # counted as activated before it, not called gaps.
    assert counts["out_of_order"] == 1 and counts["gaps"] == 0
    assert counts["activated_before_window"] == 3
    assert f"the newest {LIMIT} events" in result.headline and result.status == "warn"
