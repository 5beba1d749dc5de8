"""Postgres, NATS and the Temporal server restarted under a running remediation: exact result or a clear stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import pytest_asyncio
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from config import Settings
from contracts import names
from contracts.models import Phase, RemediationRequest, StatusView, Trigger
from devstack.processes import free_port
from devstack.stack import Postgres, Temporal
from local_platform.provider_payments import seeder_for
from local_platform.seeder import SeedSpec, seed
from tests.conftest import World, make_world
from tests.faults.harness import FAST_FAILOVER, applied_count, pinned
from tests.helpers import (
    approve,
    approve_quorum,
    assert_ledger_is_the_plan,
    decision,
    incident_in,
    start,
    start_dispute,
    wait_phase,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

T = TypeVar("T")


async def retrying(fn: Callable[[], Awaitable[T]], seconds: float = 60) -> T:
    """The test's own reads ride out the restart too."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            return await fn()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest_asyncio.fixture(loop_scope="session")
async def failover_world(
    pg_settings: Settings, template_db: str, state_root: Path, temporal_env: WorkflowEnvironment
) -> AsyncIterator[World]:
    async for w in make_world(pg_settings, template_db, state_root, temporal_env.client, **FAST_FAILOVER):
        yield w


async def restart_postgres(pg_settings: Settings) -> None:
    """Stop the real server (fast shutdown: sessions cut) and start it again on the same data."""
    server = Postgres(pg_settings)
    await asyncio.to_thread(server.stop)
    await asyncio.sleep(0.5)
    await asyncio.to_thread(server.start)


async def test_postgres_restarted_during_reconcile_and_apply(
    failover_world: World, pg_settings: Settings
) -> None:
    world = failover_world
    inject = {"unbilled_closed": 400, "orphan_open": 100, "missing_open": 100, "payment_drift": 20}
    async with world.db.acquire() as conn, seeder_for(world.settings) as provider:
        await seed(
            conn, SeedSpec(orgs=3, allocations=1500, prefix="pgr", seed=3, inject=inject), provider=provider
        )
    # Restarted while a reconcile check's INSERT ... SELECT is provably running (waiting on the pin).
    async with pinned(world, "remediation.findings", "INSERT INTO remediation.findings (run_id, pass") as pin:
        handle = await start(
            world,
            RemediationRequest(
                correlation_id="pg-restart", requested_by="ic", trigger=Trigger.WORKER_FAILURE
            ),
        )
        await pin.next_waiter()
        await restart_postgres(pg_settings)
    view = await retrying(lambda: wait_phase(handle, {Phase.AWAITING_APPROVAL}, timeout=120))
    assert view.plan is not None and view.plan.action_count == sum(inject.values())
    await approve_quorum(handle, view)
    plan_id = view.plan.plan_id
    for _ in range(6000):
        if await retrying(lambda: applied_count(world, plan_id)) > 0:
            break
        await asyncio.sleep(0.01)
    await restart_postgres(pg_settings)
    result = await asyncio.wait_for(handle.result(), timeout=240)
    assert result.outcome is Phase.COMPLETED, result
    await retrying(lambda: assert_ledger_is_the_plan(world, view.plan))  # type: ignore[arg-type]


async def test_nats_stopped_during_verification_waits_for_a_human(failover_world: World) -> None:
    world = failover_world
    _, handle = await start_dispute(world, "nv")
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    world.nats_server.stop()
    try:
        await approve(handle, decision(view, "alice"))
        stopped = await wait_phase(handle, {Phase.AWAITING_DECISION, Phase.COMPLETED}, timeout=120)
        # The data is repaired, but without NATS the worker's recovery cannot be shown: no success claimed.
        assert stopped.phase is Phase.AWAITING_DECISION
        assert stopped.verification is not None
        failed = {c.name for c in stopped.verification.criteria if not c.passed}
        assert "billing_worker_stable" in failed
        assert "no_unresolved_drift" not in failed
    finally:
        world.nats_server.start()
    await handle.execute_update(names.UPDATE_DECIDE, _verdict("bob", "hand_off"))
    result = await handle.result()
    assert result.outcome is Phase.HANDED_OFF


def _verdict(actor: str, choice: str) -> Any:
    from contracts.models import VerdictDecision

    return VerdictDecision(actor=actor, choice=choice, comment="NATS down during verification")


async def test_temporal_server_restarted_mid_run_keeps_the_run(
    pg_settings: Settings, template_db: str, state_root: Path, tmp_path: Path
) -> None:
    own = Settings(
        REMEDIATION_STATE_DIR=tmp_path / "temporal-state",
        TEMPORAL_PORT=free_port(),
        TEMPORAL_UI_PORT=free_port(),
    )
    server = Temporal(own)
    server.start()
    try:
        client = await Client.connect(own.resolved_temporal_address(), data_converter=pydantic_data_converter)
        async for world in make_world(pg_settings, template_db, state_root, client, **FAST_FAILOVER):
            await _run_across_a_server_restart(world, server)
    finally:
        with contextlib.suppress(Exception):
            server.stop()


async def _run_across_a_server_restart(world: World, server: Temporal) -> None:
    incident = await incident_in(world, "worker-crash", "tr")
    handle = await start(
        world,
        RemediationRequest(
            correlation_id=incident.correlation_id, requested_by="ic", trigger=Trigger.WORKER_FAILURE
        ),
    )
    # Mid-run: anywhere from diagnosis to waiting for approval (a fast run may already be waiting).
    await wait_phase(handle, {Phase.DIAGNOSING, Phase.FREEZING, Phase.RECONCILING, Phase.AWAITING_APPROVAL})
    await asyncio.to_thread(server.stop)  # SQLite state kept
    await asyncio.sleep(1)
    await asyncio.to_thread(server.start)
    view: StatusView = await retrying_rpc(lambda: wait_phase(handle, {Phase.AWAITING_APPROVAL}))
    assert view.plan is not None
    for who in ("alice", "bob"):
        body = decision(view, who)
        # A fixed update id: a retry after a lost answer is deduplicated by the server, not re-applied.
        await retrying_rpc(
            lambda body=body: approve(handle, body, f"approve-{body.approver}")  # type: ignore[misc]
        )
    result = await asyncio.wait_for(handle.result(), timeout=180)
    assert result.outcome is Phase.COMPLETED, result
    await assert_ledger_is_the_plan(world, view.plan)


async def retrying_rpc(fn: Callable[[], Awaitable[T]], seconds: float = 60) -> T:
    """Client calls right after the server restart may fail while it warms up."""
    from temporalio.service import RPCError

    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            return await fn()
        except (RPCError, AssertionError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)
