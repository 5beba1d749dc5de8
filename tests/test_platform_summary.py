"""Blast radius and data consistency on fast paths (issue 17): a scoped run reads the platform summary
(stating its age) instead of scanning the platform; a platform-wide run's two full-table joins come
from the summary while the indexed counts are measured now; both writers of the summary are real."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from temporalio.testing import ActivityEnvironment

from activities.postgres import BillingDatabaseActivities
from activities.postgres.platform_summary import REFRESH_LOCK, refresh_platform_summary
from contracts.models import (
    BlastRadius,
    BlastRadiusRequest,
    BlastRadiusResult,
    ReconcileRequest,
    RunRef,
    Scope,
)
from local_platform.seeder import SeedSpec, seed
from tests.conftest import World
from worker.platform_summary_refresh import refresh_platform_summary_every

pytestmark = pytest.mark.asyncio(loop_scope="session")
env = ActivityEnvironment()

# The same invariants as the check, written the slow obvious way (the truth the counts must equal).
TRUTH = {
    "usage_lifecycle": """SELECT count(*) FROM billing.usage_records u WHERE {u} AND (u.end_time < u.start_time
        OR (u.end_time IS NOT NULL AND u.last_billed_at > u.end_time)
        OR (u.end_time IS NULL AND u.accrued_cost_minor > 0))""",
    "allocation_boundary": """SELECT count(*) FROM billing.allocations a WHERE {a} AND (
        (a.status = 'released' AND a.released_at IS NULL)
        OR (a.status IN ('releasing', 'release_failed') AND a.releasing_at IS NULL))""",
    "attribution_boundary": """SELECT count(*) FROM billing.usage_records u, billing.allocations a
        WHERE a.id = u.allocation_id AND {u} AND (u.app_instance_id, u.usage_source, u.control_plane_component,
        u.operating_mode, u.control_plane_scope, u.runtime_backend) IS DISTINCT FROM (a.app_instance_id,
        a.usage_source, a.control_plane_component, a.operating_mode, a.control_plane_scope, a.runtime_backend)""",
    "ledger_projection_users": """SELECT count(*) FROM (SELECT u.requested_by_user_id,
        sum(u.accrued_cost_minor) AS cost,
        -coalesce(sum((SELECT sum(l.amount_minor) FROM billing.ledger_entries l
                       WHERE l.usage_record_id = u.id AND l.kind = 'usage_debit')), 0) AS billed
        FROM billing.usage_records u WHERE u.end_time IS NOT NULL AND {u} GROUP BY 1) d WHERE cost <> billed""",
}


async def truth(world: World, org: str | None) -> dict[str, int]:
    u = "true" if org is None else f"u.org_id = '{org}'"
    a = "true" if org is None else f"a.org_id = '{org}'"
    return {k: int(await world.db.fetchval(sql.format(u=u, a=a))) for k, sql in TRUTH.items()}


async def register(world: World, run_id: str, scope: Scope) -> RunRef:
    await world.db.execute(
        """INSERT INTO remediation.runs (run_id, workflow_id, correlation_id, trigger, scope, requested_by, dry_run)
           VALUES ($1, $1, 'summary', 'manual', $2, 'test', true)""",
        run_id,
        scope.model_dump_json(),
    )
    return RunRef(run_id=run_id, workflow_id=run_id, correlation_id="summary", scope=scope)


async def break_invariants(world: World, org: str) -> None:
    """One row breaking each consistency invariant in ``org``."""
    await world.db.execute(
        f"""UPDATE billing.usage_records SET last_billed_at = end_time + interval '1 hour'
            WHERE id = (SELECT id FROM billing.usage_records WHERE org_id = '{org}' AND end_time IS NOT NULL
                        ORDER BY id LIMIT 1)"""
    )
    await world.db.execute(
        f"""UPDATE billing.allocations SET released_at = NULL
            WHERE id = (SELECT id FROM billing.allocations WHERE org_id = '{org}' AND status = 'released'
                        ORDER BY id LIMIT 1)"""
    )
    await world.db.execute(
        f"""UPDATE billing.usage_records SET runtime_backend = 'slurm'
            WHERE id = (SELECT id FROM billing.usage_records WHERE org_id = '{org}' ORDER BY id DESC LIMIT 1)"""
    )
    await world.db.execute(
        f"""UPDATE billing.ledger_entries SET amount_minor = amount_minor - 1
            WHERE id = (SELECT id FROM billing.ledger_entries WHERE org_id = '{org}' AND kind = 'usage_debit'
                        ORDER BY id LIMIT 1)"""
    )


async def test_consistency_counts_scoped_now_and_platform_wide_from_a_recent_summary(world: World) -> None:
    async with world.db.acquire() as conn:
        await seed(conn, SeedSpec(orgs=3, allocations=600, prefix="cs", seed=41))
    await break_invariants(world, "cs-org-0001")
    acts = BillingDatabaseActivities(world.db)

    # A scope: every count measured now, exactly the truth (the broken org, and a clean one).
    for org in ("cs-org-0001", "cs-org-0002"):
        result = await env.run(
            acts.check_data_consistency, await register(world, f"cs-{org}", Scope(org_id=org))
        )
        assert result.counts == await truth(world, org)
    assert all(v >= 1 for v in (await truth(world, "cs-org-0001")).values())

    # Platform-wide without a summary: measured now, in full.
    glob = await env.run(acts.check_data_consistency, await register(world, "cs-g1", Scope()))
    assert glob.counts == await truth(world, None)
    assert "platform summary" not in glob.headline

    # With a recent summary, the two full-table joins come from it (its age stated); the indexed
    # counts are still measured now: a violation after the summary shows in them at once.
    assert await refresh_platform_summary(world.db)
    measured = await truth(world, None)
    await break_invariants(world, "cs-org-0002")
    now = await truth(world, None)
    glob = await env.run(acts.check_data_consistency, await register(world, "cs-g2", Scope()))
    assert re.search(
        r"from the platform summary measured at \d\d:\d\d:\d\d UTC, \d+ s before this check", glob.headline
    ), glob.headline
    assert glob.counts["usage_lifecycle"] == now["usage_lifecycle"] > measured["usage_lifecycle"]
    assert glob.counts["allocation_boundary"] == now["allocation_boundary"] > measured["allocation_boundary"]
    assert glob.counts["attribution_boundary"] == measured["attribution_boundary"]
    assert glob.counts["ledger_projection_users"] == measured["ledger_projection_users"]

    # Too old to stand in: measured in full again.
    await world.db.execute(
        "UPDATE remediation.platform_summaries SET measured_at = now() - interval '1 hour'"
    )
    glob = await env.run(acts.check_data_consistency, await register(world, "cs-g3", Scope()))
    assert glob.counts == now and "platform summary" not in glob.headline


async def test_a_scoped_blast_radius_reads_the_platform_summary_and_states_its_age(world: World) -> None:
    async with world.db.acquire() as conn:
        report = await seed(
            conn,
            SeedSpec(
                orgs=5,
                allocations=200,
                prefix="br",
                seed=43,
                inject={"unbilled_closed": 10, "orphan_open": 5},
            ),
        )
    drifted_orgs = set(
        await world.db.fetchval(
            "SELECT array_agg(DISTINCT org_id) FROM billing.allocations WHERE id = ANY($1::text[])",
            report.injected["unbilled_closed"],
        )
    )
    user = await world.db.fetchval(
        "SELECT requested_by_user_id FROM billing.allocations WHERE id = $1",
        report.injected["unbilled_closed"][0],
    )
    acts = BillingDatabaseActivities(world.db, summary_max_age_s=600)

    async def assess(n: int) -> BlastRadiusResult:
        ref = await register(world, f"br-{n}", Scope(user_id=user))
        return await env.run(
            acts.assess_blast_radius,
            BlastRadiusRequest(ref=ref, worker_degraded=False, widespread_org_threshold=3),
        )

    # No summary: the dispute keeps its own risk and says the platform was not measured (no scan).
    first = await assess(1)
    assert first.radius is BlastRadius.SINGLE and (first.drift_in_scope or 0) >= 1
    assert first.orgs_with_drift is None and first.platform_degradation is None
    assert any("platform-wide drift not measured in the last 10 min" in r for r in first.reasons)

    # The worker's refresh: the same dispute now names the wider drift, with the summary's age.
    assert await refresh_platform_summary(world.db)
    second = await assess(2)
    assert second.orgs_with_drift is not None and second.orgs_with_drift >= len(drifted_orgs) >= 3
    assert second.platform_summary_age_s is not None and second.platform_summary_age_s < 60
    assert second.platform_degradation is not None
    assert re.search(
        rf"drift in {second.orgs_with_drift} orgs \(threshold 3; platform summary of \d+ s ago\)",
        second.platform_degradation.headline,
    )
    assert second.radius is BlastRadius.SINGLE

    # Older than PLATFORM_SUMMARY_MAX_AGE_SECONDS: not used.
    await world.db.execute(
        "UPDATE remediation.platform_summaries SET measured_at = now() - interval '11 minutes'"
    )
    third = await assess(3)
    assert third.orgs_with_drift is None and third.platform_degradation is None


async def test_a_platform_wide_reconcile_records_the_drift_it_found(world: World) -> None:
    async with world.db.acquire() as conn:
        await seed(conn, SeedSpec(orgs=4, allocations=300, prefix="rp", seed=47, inject={"missing_open": 6}))
    acts = BillingDatabaseActivities(world.db)
    ref = await register(world, "rp-global", Scope())
    summary = await env.run(acts.reconcile, ReconcileRequest(ref=ref, pass_no=0))
    row = await world.db.fetchrow(
        "SELECT * FROM remediation.platform_summaries WHERE source = 'reconcile rp-global'"
    )
    assert row is not None and row["consistency"] is None
    assert json.loads(row["drift_by_kind"]) == summary.counts
    orgs = await world.db.fetchval(
        "SELECT count(DISTINCT org_id) FROM remediation.findings WHERE run_id = 'rp-global'"
    )
    assert row["orgs_with_drift"] == orgs >= 1


async def test_the_worker_refreshes_the_summary_one_refresher_at_a_time(world: World) -> None:
    async with world.db.acquire() as holder:
        # Another worker holds the refresh: this one skips instead of measuring twice.
        await holder.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", REFRESH_LOCK)
        assert await refresh_platform_summary(world.db) is False
        await holder.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", REFRESH_LOCK)
    before = await world.db.fetchval(
        "SELECT count(*) FROM remediation.platform_summaries WHERE source = 'refresh'"
    )
    task = asyncio.create_task(refresh_platform_summary_every(world.db, 3600))
    try:
        for _ in range(100):
            count = await world.db.fetchval(
                "SELECT count(*) FROM remediation.platform_summaries WHERE source = 'refresh'"
            )
            if count > before:
                break
            await asyncio.sleep(0.1)
        assert count == before + 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
