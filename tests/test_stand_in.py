"""The platform stand-in against real Postgres and NATS: the seeder injects exactly what it reports,
the admin API answers as the runbook says."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from local_platform.seeder import SeedReport, SeedSpec, parse_inject, seed
from tests.conftest import World
from tests.helpers import DRIFT_SQL, drift, incident_in

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_big_seed_prints_counts_and_writes_its_ids_to_a_file(world: World, tmp_path: Path) -> None:
    async with world.db.acquire() as conn:
        report = await seed(
            conn, SeedSpec(orgs=3, allocations=600, prefix="big", inject={"unbilled_closed": 60})
        )
    printed = report.summary()
    assert printed["injected"] == {
        "missing_open": 0,
        "orphan_open": 0,
        "unbilled_closed": 60,
        "payment_drift": 0,
    }
    assert "injected_ids" not in printed
    assert printed["injected_ids_omitted"] == "60 ids; --ids-file PATH writes them"
    path = tmp_path / "ids.json"
    written = report.summary(path)
    assert written["injected_ids_file"] == str(path) and "injected_ids" not in written
    assert json.loads(path.read_text()) == report.injected
    assert not path.with_name("ids.json.tmp").exists()
    small = await seed_small(world)
    assert isinstance(small.summary()["injected_ids"], dict)  # a screenful stays inline


async def seed_small(world: World) -> SeedReport:
    async with world.db.acquire() as conn:
        return await seed(conn, SeedSpec(orgs=2, allocations=40, prefix="small", inject={"missing_open": 2}))


async def test_seed_injects_exactly_what_it_reports(world: World) -> None:
    async with world.db.acquire() as conn:
        clean = await seed(conn, SeedSpec(orgs=4, allocations=200, prefix="c", seed=3), world.nc)
    assert clean.injected == {
        k: [] for k in ("missing_open", "orphan_open", "unbilled_closed", "payment_drift")
    }
    assert await drift(world) == {k: set() for k in DRIFT_SQL}
    # Ledger agrees with usage: every closed usage record with cost has exactly its debit.
    assert (
        await world.db.fetchval(
            """SELECT count(*) FROM billing.usage_records u LEFT JOIN billing.ledger_entries l ON l.usage_record_id = u.id
           WHERE u.end_time IS NOT NULL AND -coalesce(l.amount_minor, 0) <> u.accrued_cost_minor"""
        )
        == 0
    )
    async with world.db.acquire() as conn:
        dirty = await seed(
            conn,
            SeedSpec(
                orgs=3,
                allocations=150,
                prefix="d",
                seed=5,
                inject=parse_inject("missing_open=3,orphan_open=2,unbilled_closed=4,payment_drift=5"),
            ),
            world.nc,
        )
    found = await drift(world)
    assert found["missing_open"] == set(dirty.injected["missing_open"])
    assert found["orphan_open"] == set(dirty.injected["orphan_open"])
    assert found["unbilled_closed"] == set(dirty.injected["unbilled_closed"])
    assert found["payment_drift"] == set(dirty.injected["payment_drift"])
    with pytest.raises(ValueError, match="unknown drift kind"):
        parse_inject("bogus=1")


async def test_admin_api_restricted_state_matches_runbook(world: World) -> None:
    incident = await incident_in(world, "prepaid-depleted", "ap")
    org = incident.scope["org_id"]
    url = world.settings.resolved_billing_api_url()
    auth = {"Authorization": f"Bearer {world.settings.billing_api_token.get_secret_value()}"}
    async with httpx.AsyncClient(base_url=url) as http:
        assert (
            await http.get(
                "/api/v1/billing/financial-posture", headers={"Authorization": "Bearer nope", "X-Org-ID": org}
            )
        ).status_code == 401
        posture = (
            await http.get("/api/v1/billing/financial-posture", headers={**auth, "X-Org-ID": org})
        ).json()
        assert posture["state"] == "restricted" and posture["reason"] == "prepaid_balance_depleted"
        assert posture["effects"]["block_new_launches"] is True
        pre = (
            await http.post(
                "/api/v1/v3/launch/compute/precheck",
                json={"sku": "compute-vm-small"},
                headers={**auth, "X-Project-ID": "ap-prj-0000-0"},
            )
        ).json()
        assert next(c for c in pre["checks"] if c["id"] == "billing")["severity"] == "blocker"
        submit = await http.post(
            "/api/v1/v3/launch/compute",
            json={"sku": "compute-vm-small"},
            headers={**auth, "X-Project-ID": "ap-prj-0000-0"},
        )
        assert submit.status_code == 402 and submit.json()["error"]["code"] == "insufficient_balance"
        # Freeze refuses manual adjustments for the org until lifted.
        await http.post(
            "/api/v1/admin/billing/adjustments/freeze",
            headers=auth,
            json={"freeze_id": "f1", "scope_key": f"org:{org}", "reason": "test", "actor": "t"},
        )
        adj = {
            "org_id": org,
            "user_id": "ap-usr-0000-0",
            "amount_minor": 100,
            "reason": "goodwill",
            "actor": "t",
            "idempotency_key": "adj-1",
        }
        assert (
            await http.post("/api/v1/admin/billing/adjustments", headers=auth, json=adj)
        ).status_code == 423
        await http.post(
            "/api/v1/admin/billing/adjustments/unfreeze", headers=auth, json={"freeze_id": "f1", "actor": "t"}
        )
        assert (
            await http.post("/api/v1/admin/billing/adjustments", headers=auth, json=adj)
        ).status_code == 200
        again = (await http.post("/api/v1/admin/billing/adjustments", headers=auth, json=adj)).json()
        assert again["duplicate"] is True


async def test_seed_refuses_bad_input_before_writing(world: World) -> None:
    with pytest.raises(ValueError, match="--orgs"):
        SeedSpec(orgs=0)
    with pytest.raises(ValueError, match="--prefix"):
        SeedSpec(prefix="Bad Prefix!")
    async with world.db.acquire() as conn:
        await seed(conn, SeedSpec(orgs=1, allocations=5, prefix="dup"))
        before = await conn.fetchval("SELECT count(*) FROM billing.allocations")
        with pytest.raises(ValueError, match="already seeded"):
            await seed(conn, SeedSpec(orgs=2, allocations=5, prefix="dup"))
        assert await conn.fetchval("SELECT count(*) FROM billing.allocations") == before
