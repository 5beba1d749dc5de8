"""Worker rollback: a runtime regression of the billing worker's current revision is rolled back (approved
with the rest of the plan) and verified; without the regression's signature the plan still restarts."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from contracts.models import Phase
from tests.conftest import World
from tests.helpers import approve_quorum, incident_in, request_for, start, wait_phase

pytestmark = pytest.mark.asyncio(loop_scope="session")


def admin(world: World) -> httpx.AsyncClient:
    token = world.settings.billing_api_token.get_secret_value()
    return httpx.AsyncClient(
        base_url=world.settings.resolved_billing_api_url(), headers={"Authorization": f"Bearer {token}"}
    )


async def deployments(world: World) -> dict[str, Any]:
    async with admin(world) as api:
        response = await api.get("/api/v1/admin/billing-worker/deployments")
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


async def test_a_runtime_regression_is_rolled_back_and_verified(world: World) -> None:
    incident = await incident_in(world, "worker-regression", "wr")
    before = await deployments(world)
    assert before["current"]["version"] == "v1.43.0" and before["previous"]["version"] == "v1.42.0"
    handle = await start(world, request_for(incident, requested_by="ic-dana"))
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    regression = next(c for c in view.diagnosis if c.check == "worker_regression")
    assert regression.status == "critical", regression
    assert (
        "v1.43.0" in regression.headline
        and regression.counts["rollback_to"] == before["previous"]["revision"]
    )
    assert view.plan is not None
    assert view.plan.counts_by_kind.get("rollback_billing_worker") == 1
    assert "restart_billing_worker" not in view.plan.counts_by_kind
    # Nothing is rolled back before approval.
    assert (await deployments(world))["current"]["version"] == "v1.43.0"

    await approve_quorum(handle, view)
    result = await handle.result()
    assert result.outcome is Phase.COMPLETED, result
    assert result.verification is not None
    criteria = {c.name: c for c in result.verification.criteria}
    assert criteria["worker_rolled_back"].passed and "v1.42.0" in criteria["worker_rolled_back"].detail
    assert criteria["billing_worker_stable"].passed, criteria["billing_worker_stable"]
    after = await deployments(world)
    assert after["current"]["version"] == "v1.42.0"
    assert next(r for r in after["history"] if r["version"] == "v1.43.0")["rolled_back_at"] is not None
    audited = await world.db.fetch(
        """SELECT outcome, after->>'detail' AS detail FROM remediation.applied_actions
           WHERE plan_id = $1 AND kind = 'rollback_billing_worker'""",
        view.plan.plan_id,
    )
    assert [(r["outcome"], r["detail"]) for r in audited] == [("applied", "worker runs v1.42.0")]


async def test_without_the_regression_signature_the_plan_restarts(world: World) -> None:
    incident = await incident_in(world, "worker-crash", "nr")
    handle = await start(world, request_for(incident, requested_by="ic-dana"))
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    regression = next(c for c in view.diagnosis if c.check == "worker_regression")
    assert regression.status == "ok" and "rollback_to" not in regression.counts
    assert view.plan is not None
    assert view.plan.counts_by_kind.get("restart_billing_worker") == 1
    assert "rollback_billing_worker" not in view.plan.counts_by_kind
    await handle.terminate("test done")


async def test_the_rollback_hook_refuses_what_is_not_a_rollback(world: World) -> None:
    current = (await deployments(world))["current"]["revision"]
    async with admin(world) as api:

        async def rollback(target: object) -> httpx.Response:
            return await api.post(
                "/api/v1/admin/billing-worker/rollback", json={"actor": "test", "to_revision": target}
            )

        assert (await rollback("two")).status_code == 400
        assert (await rollback(999)).status_code == 404
        assert (await rollback(current + 0)).json()["duplicate"] is True
        assert (await rollback(current)).status_code == 200
        unauthorized = await api.post(
            "/api/v1/admin/billing-worker/rollback",
            json={"actor": "x", "to_revision": 1},
            headers={"Authorization": "Bearer wrong"},
        )
        assert unauthorized.status_code == 401
    assert (await deployments(world))["current"]["revision"] == current
