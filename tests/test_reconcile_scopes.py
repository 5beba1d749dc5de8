"""Scoped reconciliation finds exactly the global findings inside the scope, however it is narrowed."""

from __future__ import annotations

import random

import pytest
from temporalio.testing import ActivityEnvironment

from activities.postgres import BillingDatabaseActivities
from contracts.models import ReconcileRequest, RunRef, Scope
from local_platform.seeder import SeedSpec, seed
from tests.conftest import World

pytestmark = pytest.mark.asyncio(loop_scope="session")

FINDING = (
    "SELECT kind, entity_id, amount_minor, detail FROM remediation.findings WHERE run_id = $1 ORDER BY 1, 2"
)


async def reconcile(world: World, run_id: str, scope: Scope) -> list[tuple[object, ...]]:
    await world.db.execute(
        """INSERT INTO remediation.runs (run_id, workflow_id, correlation_id, trigger, scope, requested_by, dry_run)
           VALUES ($1, $1, 'scopes', 'manual', $2, 'test', true)""",
        run_id,
        scope.model_dump_json(),
    )
    ref = RunRef(run_id=run_id, workflow_id=run_id, correlation_id="scopes", scope=scope)
    await ActivityEnvironment().run(
        BillingDatabaseActivities(world.db).reconcile, ReconcileRequest(ref=ref, pass_no=0)
    )
    return [tuple(r) for r in await world.db.fetch(FINDING, run_id)]


async def test_scoped_findings_equal_the_global_findings_in_scope(world: World) -> None:
    inject = {"missing_open": 30, "orphan_open": 30, "unbilled_closed": 40, "payment_drift": 12}
    async with world.db.acquire() as conn:
        await seed(conn, SeedSpec(orgs=4, allocations=1500, prefix="sc", seed=21, inject=inject))
    # A usage row recorded under the wrong org (another kind of corruption) still counts as the
    # allocation's open usage: the scoped check must not call that allocation "missing".
    moved = await world.db.fetchrow(
        """UPDATE billing.usage_records u SET org_id = 'sc-org-0001'
           WHERE u.id = (SELECT u2.id FROM billing.usage_records u2 JOIN billing.allocations a ON a.id = u2.allocation_id
                         WHERE u2.end_time IS NULL AND a.status = 'active' AND a.org_id = 'sc-org-0000'
                         ORDER BY u2.id LIMIT 1)
           RETURNING allocation_id"""
    )
    everything = await reconcile(world, "sc-global", Scope())
    assert len(everything) == sum(inject.values())
    rows = await world.db.fetch(
        "SELECT id, org_id, project_id, requested_by_user_id FROM billing.allocations WHERE id LIKE 'sc-%'"
    )
    rng = random.Random(4)
    sample = rng.sample(list(rows), 6)
    scopes = [Scope(org_id="sc-org-0000"), Scope(org_id="sc-org-0003")]
    scopes += [Scope(project_id=r["project_id"]) for r in sample[:2]]
    scopes += [Scope(user_id=r["requested_by_user_id"]) for r in sample[2:4]]
    scopes += [Scope(org_id=r["org_id"], user_id=r["requested_by_user_id"]) for r in sample[4:5]]
    drifted = await world.db.fetch(
        "SELECT entity_id, allocation_id FROM remediation.findings WHERE run_id = 'sc-global' AND allocation_id IS NOT NULL"
    )
    scopes += [Scope(allocation_id=drifted[0]["allocation_id"])]
    owners = {
        r["id"]: {"org_id": r["org_id"], "project_id": r["project_id"], "user_id": r["requested_by_user_id"]}
        for r in rows
    }
    pay_owner = {
        r["id"]: {"org_id": r["org_id"], "user_id": r["user_id"]}
        for r in await world.db.fetch(
            "SELECT id, org_id, user_id FROM billing.payment_sessions WHERE id LIKE 'sc-%'"
        )
    }
    allocation_of = {
        r["entity_id"]: r["allocation_id"]
        for r in await world.db.fetch(
            "SELECT entity_id, allocation_id FROM remediation.findings WHERE run_id = 'sc-global'"
        )
    }
    for n, scope in enumerate(scopes):
        wanted = {k: v for k, v in scope.model_dump().items() if v}

        def inside(finding: tuple[object, ...], wanted: dict[str, str] = wanted) -> bool:
            kind, entity = finding[0], str(finding[1])
            if kind == "payment_drift":
                owner = pay_owner[entity]
                return all(owner.get(k) == v for k, v in wanted.items())
            allocation = allocation_of[entity]
            owner = {**owners[allocation], "allocation_id": allocation}
            return all(owner.get(k) == v for k, v in wanted.items())

        expected = [f for f in everything if inside(f)]
        assert await reconcile(world, f"sc-scoped-{n}", scope) == expected, scope
    assert moved is not None
    assert not any(f[0] == "missing_open_usage" and f[1] == moved["allocation_id"] for f in everything)
