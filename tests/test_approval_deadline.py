"""Approval deadlines on Temporal's time-skipping test server: escalate, keep waiting, expire unchanged."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from nats.aio.msg import Msg
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


async def escalations(world: World) -> tuple[list[dict[str, Any]], Any]:
    seen: list[dict[str, Any]] = []

    async def on_msg(msg: Msg) -> None:
        seen.append(json.loads(msg.data))

    sub = await world.nc.subscribe("remediation.escalations", cb=on_msg)
    return seen, sub


async def skipped_result(env: WorkflowEnvironment, handle: Any) -> RemediationResult:
    """Await the result with the virtual clock running (handles not made by start_workflow lock it)."""
    async with env.time_skipping_unlocked():  # type: ignore[attr-defined]
        result: RemediationResult = await handle.result()
    return result


async def test_unanswered_approval_escalates_then_expires_without_change(
    skipping_world: World, time_skipping_env: WorkflowEnvironment
) -> None:
    world = skipping_world
    seen, sub = await escalations(world)
    _, handle = await start_dispute(world, "ex")
    await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    ledger_before = await ledger_state(world)
    result = await skipped_result(time_skipping_env, handle)  # 30 virtual minutes
    assert result.outcome is Phase.EXPIRED
    assert await ledger_state(world) == ledger_before
    await world.nc.flush()
    await eventually(lambda: _true(len(seen) >= 2), what="both escalations delivered")
    await sub.unsubscribe()
    # Two deadlines passed before the hard limit: tier 2 (carol) first, then everyone.
    assert [m["next_tier"] for m in seen] == [2, 3]
    assert seen[0]["next_approvers"] == ["carol"]
    assert all(m["plan_hash"] == result.plan.plan_hash for m in seen)  # type: ignore[union-attr]
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
    seen, sub = await escalations(world)
    _, handle = await start_dispute(world, "es")
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    await time_skipping_env.sleep(DEADLINE + 5)
    await eventually(lambda: _true(bool(seen)), interval=0.1, what="the escalation delivered")
    await sub.unsubscribe()
    assert [m["next_tier"] for m in seen] == [1 + 1]
    status = await handle.query(names.QUERY_STATUS, result_type=StatusView)
    assert status.phase is Phase.AWAITING_APPROVAL
    # Signed on the server's virtual clock, which runs ahead of the wall clock once time was skipped.
    virtual_now = await time_skipping_env.get_current_time()
    await handle.execute_update(names.UPDATE_APPROVE, decision(view, "carol", at=virtual_now))
    result = await skipped_result(time_skipping_env, handle)  # skips the verification window too
    assert result.outcome is Phase.COMPLETED
    assert result.approvers == ["carol"]


async def _true(value: bool) -> bool:
    return value
