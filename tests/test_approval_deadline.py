"""Approval deadlines on Temporal's time-skipping test server: escalate, keep waiting, expire unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from config import Settings
from contracts import names
from contracts.models import Phase, RemediationResult, StatusView
from tests.conftest import World, make_world
from tests.helpers import decision, eventually, ledger_state, start_dispute, wait_phase
from tests.histories import keep_history

pytestmark = pytest.mark.asyncio(loop_scope="session")

DEADLINE = 600
HARD_LIMIT = 1800


@pytest_asyncio.fixture(loop_scope="session")
async def skipping_world(
    pg_settings: Settings, template_db: str, state_root: Path, time_skipping_env: WorkflowEnvironment
) -> AsyncIterator[World]:
    async for w in make_world(
        pg_settings,
        template_db,
        state_root,
        time_skipping_env.client,
        APPROVAL_DEADLINE_SECONDS=DEADLINE,
        APPROVAL_HARD_LIMIT_SECONDS=HARD_LIMIT,
        VERIFY_WINDOW_SECONDS=30,
    ):
        yield w


async def paged_tiers(world: World, workflow_id: str) -> list[str]:
    """The tiers whose page for ``workflow_id`` is active in the session's real Alertmanager."""
    filters: list[tuple[str, str | int | float | bool | None]] = [
        ("filter", 'alertname="RemediationAwaitingApproval"'),
        ("filter", f'workflow_id="{workflow_id}"'),
    ]
    async with httpx.AsyncClient(base_url=world.settings.resolved_alertmanager_url()) as http:
        response = await http.get("/api/v2/alerts", params=filters)
    response.raise_for_status()
    return sorted(a["labels"]["tier"] for a in response.json())


async def tiers_become(world: World, workflow_id: str, expected: list[str]) -> None:
    async def seen() -> bool:
        return await paged_tiers(world, workflow_id) == expected

    await eventually(seen, interval=0.1, what=f"the pages of {workflow_id} to be {expected}")


async def skipped_result(env: WorkflowEnvironment, handle: Any) -> RemediationResult:
    """Await the result with the virtual clock running (handles not made by start_workflow lock it)."""
    async with env.time_skipping_unlocked():  # type: ignore[attr-defined]
        result: RemediationResult = await handle.result()
    return result


async def test_unanswered_approval_escalates_then_expires_without_change(
    skipping_world: World, time_skipping_env: WorkflowEnvironment
) -> None:
    world = skipping_world
    _, handle = await start_dispute(world, "ex")
    await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    ledger_before = await ledger_state(world)
    # Tier 1 is paged when the plan opens; each deadline pages the next tier (2: carol), then everyone.
    await tiers_become(world, handle.id, ["1"])
    await time_skipping_env.sleep(DEADLINE + 5)
    await tiers_become(world, handle.id, ["1", "2"])
    await time_skipping_env.sleep(DEADLINE)
    await tiers_become(world, handle.id, ["1", "2", "all"])
    result = await skipped_result(time_skipping_env, handle)  # to the hard limit
    assert result.outcome is Phase.EXPIRED
    assert await ledger_state(world) == ledger_before
    # Expired: every page resolved.
    await tiers_become(world, handle.id, [])
    assert (
        await world.db.fetchval(
            "SELECT count(*) FROM remediation.applied_actions a JOIN remediation.plans p USING (plan_id)"
            " WHERE p.run_id = $1",
            handle.result_run_id,
        )
        == 0
    )
    assert (
        await world.db.fetchval(
            "SELECT outcome FROM remediation.runs WHERE run_id = $1", handle.result_run_id
        )
        == "expired"
    )
    await keep_history(handle, "expired")


async def test_escalated_approval_is_still_accepted(
    skipping_world: World, time_skipping_env: WorkflowEnvironment
) -> None:
    world = skipping_world
    _, handle = await start_dispute(world, "es")
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    await time_skipping_env.sleep(DEADLINE + 5)
    await tiers_become(world, handle.id, ["1", "2"])
    status = await handle.query(names.QUERY_STATUS, result_type=StatusView)
    assert status.phase is Phase.AWAITING_APPROVAL
    # Signed on the server's virtual clock, which runs ahead of the wall clock once time was skipped.
    virtual_now = await time_skipping_env.get_current_time()
    await handle.execute_update(names.UPDATE_APPROVE, decision(view, "carol", at=virtual_now))
    result = await skipped_result(time_skipping_env, handle)  # skips the verification window too
    assert result.outcome is Phase.COMPLETED
    assert result.approvers == ["carol"]
    await tiers_become(world, handle.id, [])
