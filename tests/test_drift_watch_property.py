"""The drift watch is exact (issue 26): for random sequences of platform changes, some announced by an
event and some not, a tick finds exactly the drift a full reconciliation finds on the keys the events
named, and the full pass finds exactly what one full reconciliation finds. Real Postgres and NATS."""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from temporalio.testing import ActivityEnvironment

from activities.postgres.drift_sql import checks
from activities.postgres.watch import WatchDatabaseActivities
from activities.watch_events import WatchEventActivities
from contracts.models import Scope
from contracts.watch import CheckRequest, PlanTick, WatchConfig, WatchTickRequest
from local_platform.events import publish_stored
from local_platform.seeder import SeedSpec, seed
from tests.conftest import World

CONFIG = WatchConfig(watch_id="prop", settle_seconds=0, every_seconds=60)
# What a change does to the billing data, which key its event names, and the drift it makes.
CHANGES: dict[str, tuple[str, str, str]] = {
    # a debit lost: the closed record is unbilled
    "lose_debit": (
        """DELETE FROM billing.ledger_entries l USING billing.usage_records u
           WHERE l.usage_record_id = u.id AND l.kind = 'usage_debit' AND u.id = (
               SELECT u2.id FROM billing.usage_records u2 JOIN billing.ledger_entries l2
               ON l2.usage_record_id = u2.id AND l2.kind = 'usage_debit' WHERE u2.org_id LIKE 'pp-%'
               ORDER BY u2.id OFFSET $1 % greatest(1, (SELECT count(*) FROM billing.ledger_entries
                   WHERE kind = 'usage_debit')) LIMIT 1)
           RETURNING u.allocation_id""",
        "billing.usage_debit_reverted",
        "allocation",
    ),
    # released with its usage left open: an orphan
    "orphan": (
        """UPDATE billing.allocations SET status = 'released', released_at = now() WHERE id = (
               SELECT a.id FROM billing.allocations a JOIN billing.usage_records u ON u.allocation_id = a.id
               AND u.end_time IS NULL WHERE a.status = 'active' AND a.id LIKE 'pp-%'
               ORDER BY a.id OFFSET $1 % greatest(1, (SELECT count(*) FROM billing.allocations WHERE status = 'active'))
               LIMIT 1) RETURNING id""",
        "billing.allocation_changed",
        "allocation",
    ),
    # an active allocation's open usage record gone: missing
    "lose_open_usage": (
        """DELETE FROM billing.usage_records WHERE id = (
               SELECT u.id FROM billing.usage_records u JOIN billing.allocations a ON a.id = u.allocation_id
               WHERE u.end_time IS NULL AND a.status = 'active' AND a.id LIKE 'pp-%'
                 AND NOT EXISTS (SELECT 1 FROM billing.ledger_entries l WHERE l.usage_record_id = u.id)
               ORDER BY u.id OFFSET $1 % greatest(1, (SELECT count(*) FROM billing.usage_records WHERE end_time IS NULL))
               LIMIT 1) RETURNING allocation_id""",
        "billing.allocation_changed",
        "allocation",
    ),
    # a completed payment whose reconcile failed afterwards
    "payment": (
        """UPDATE billing.payment_sessions SET status = 'failed_reconcile' WHERE id = (
               SELECT p.id FROM billing.payment_sessions p WHERE p.status = 'completed' AND p.id LIKE 'pp-%'
               ORDER BY p.id OFFSET $1 % greatest(1, (SELECT count(*) FROM billing.payment_sessions
                   WHERE status = 'completed')) LIMIT 1) RETURNING id""",
        "payments.reconcile_failed",
        "payment_session",
    ),
}
changes = st.lists(
    st.tuples(st.sampled_from(sorted(CHANGES)), st.integers(0, 500), st.booleans()), min_size=1, max_size=6
)


async def _full_reconciliation(world: World) -> set[tuple[str, str, str | None]]:
    """(kind, entity, allocation) of every finding one full reconciliation makes, by its own SQL."""
    found: set[tuple[str, str, str | None]] = set()
    for check in checks(Scope(), 1).values():
        for row in await world.db.fetch(check.statement(), *check.params):
            found.add((row[0], row[2], row[6]))
    return found


async def _tick_findings(world: World, tick_id: str) -> set[tuple[str, str, str | None]]:
    rows = await world.db.fetch(
        "SELECT kind, entity_id, allocation_id FROM remediation.watch_findings WHERE tick_id = $1", tick_id
    )
    return {(r["kind"], r["entity_id"], r["allocation_id"]) for r in rows}


class Watch:
    """The watch's activities run directly (the workflow only orders them)."""

    def __init__(self, world: World) -> None:
        self.db = WatchDatabaseActivities(world.db)
        self.events = WatchEventActivities(
            world.settings.resolved_nats_url(),
            world.settings.billing_stream,
            world.settings.billing_consumer,
            world.db,
        )
        self.env = ActivityEnvironment()
        self.ticks = 0

    async def tick(self, *, full: bool) -> str:
        self.ticks += 1
        tick_id = f"prop-{self.ticks}"
        tick = await self.env.run(
            self.db.plan_tick, PlanTick(request=WatchTickRequest(config=CONFIG), tick_id=tick_id)
        )
        collected = await self.env.run(self.events.collect_changed_keys, tick)
        request = CheckRequest(tick=tick, config=CONFIG, worker=collected.worker)
        await self.env.run(self.db.full_pass if full else self.db.check_changed_keys, request)
        return tick_id


WATCHES: dict[int, Watch] = {}


# One world for every example (the fixture is the test's): each example's changes add to the last's, so
# an example cannot be replayed on the same state: no shrinking, and a fixed sequence of examples in CI.
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    phases=(Phase.explicit, Phase.generate),
    derandomize=True,
    database=None,
)
@given(sequence=changes)
async def test_ticks_and_the_full_pass_find_exactly_what_a_full_reconciliation_finds(
    world: World, sequence: list[tuple[str, int, bool]]
) -> None:
    watch = WATCHES.get(id(world))
    if watch is None:
        async with world.db.acquire() as conn:
            await seed(conn, SeedSpec(orgs=4, allocations=80, prefix="pp", seed=31, publish_events_limit=0))
        watch = WATCHES[id(world)] = Watch(world)
        await watch.tick(full=True)  # the watch's first pass: from here on only events count
    announced: set[str] = set()
    for change, pick, with_event in sequence:
        sql, subject, key_kind = CHANGES[change]
        key = await world.db.fetchval(sql, pick)
        if key is None or not with_event:
            continue  # nothing to change there, or a change that bypasses events (a hand edit)
        field = "allocation_id" if key_kind == "allocation" else "payment_session_id"
        await publish_stored(world.nc, subject, "prop", "", **{field: key})
        announced.add(key)
    await world.nc.flush()
    everything = await _full_reconciliation(world)
    tick = await _tick_findings(world, await watch.tick(full=False))
    # The tick: exactly the full reconciliation's findings on the keys the events named.
    assert tick == {
        f for f in everything if f[2] in announced or (f[0] == "payment_drift" and f[1] in announced)
    }
    # The full pass: exactly the full reconciliation.
    full = await _tick_findings(world, await watch.tick(full=True))
    assert full == everything
