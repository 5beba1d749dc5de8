"""A dry run of a widespread incident touches nothing on the platform: no freeze, no billing row changed."""

from __future__ import annotations

import pytest

import remediation_client as operations
from contracts import names
from contracts.models import BlastRadius, Phase, StatusView
from tests.conftest import World
from tests.helpers import incident_in, request_for, start

pytestmark = pytest.mark.asyncio(loop_scope="session")

TABLES = (
    "orgs", "projects", "users", "allocations", "usage_records", "payment_sessions", "ledger_entries",
    "outbox", "financial_restrictions", "adjustment_freezes", "admin_audit", "worker_control",
    "worker_deployments",
)  # fmt: skip


async def platform_digest(world: World) -> dict[str, str]:
    """Every billing table's rows, hashed (the table names are this module's constants)."""
    return {
        table: await world.db.fetchval(
            f"SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM billing.{table} t"
        )
        for table in TABLES
    }


async def test_a_dry_run_of_a_widespread_incident_leaves_the_platform_unchanged(world: World) -> None:
    incident = await incident_in(world, "worker-crash", "dr")
    before = await platform_digest(world)
    handle = await start(world, request_for(incident, requested_by="ic-dana", dry_run=True))
    result = await handle.result()
    assert result.outcome is Phase.DRY_RUN_COMPLETE, result
    assert result.blast_radius is BlastRadius.WIDESPREAD
    assert result.plan is not None and not result.plan.empty
    assert await platform_digest(world) == before
    # It says what a real run would have done.
    said = await world.db.fetchval(
        "SELECT count(*) FROM remediation.timeline WHERE run_id = $1 AND message LIKE 'dry run: a real run would freeze%'",
        result.run_id,
    )
    assert said == 1
    # An ended run's status comes with its result (no query replaying the history): the same view.
    from_query = await handle.query(names.QUERY_STATUS, result_type=StatusView)
    assert result.status == from_query
    assert await operations.status(world.client, handle.id) == from_query
    assert from_query.phase is Phase.DRY_RUN_COMPLETE and from_query.drift
