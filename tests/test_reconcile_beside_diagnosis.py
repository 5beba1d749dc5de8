"""The first pass reconciles beside the slower diagnosis checks, and the plan waits for every one of them
(issue 29): with Loki's answer held, the reconciliation completes but no plan is built until Loki answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle

from config import Settings
from contracts import names
from contracts.models import Phase, RemediationRequest, Trigger
from devstack.processes import free_port
from tests.conftest import World, make_world
from tests.helpers import eventually, incident_in, start, wait_phase

# Loki's documented answer with no streams (GET /loki/api/v1/query_range).
EMPTY = json.dumps({"status": "success", "data": {"resultType": "streams", "result": []}}).encode()


class HeldLoki:
    """A Loki that answers every query_range only once released (a slow log search)."""

    def __init__(self) -> None:
        self.released = asyncio.Event()
        self.asked = 0
        self.port = free_port()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass  # the request line and headers; a GET has no body
        self.asked += 1
        await self.released.wait()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(EMPTY)}\r\n\r\n".encode()
            + EMPTY
        )
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> HeldLoki:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.released.set()
        self._server.close()


@pytest_asyncio.fixture(loop_scope="session")
async def held(
    pg_settings: Settings, template_db: str, state_root: Path, temporal_env: Any
) -> AsyncIterator[tuple[World, HeldLoki]]:
    async with HeldLoki() as loki:
        async for world in make_world(
            pg_settings,
            template_db,
            state_root,
            temporal_env.client,
            LOKI_URL=f"http://127.0.0.1:{loki.port}",
        ):
            yield world, loki


async def _activities(handle: WorkflowHandle[Any, Any]) -> tuple[list[str], list[str]]:
    """(activity types in the order scheduled, activity types in the order completed)."""
    scheduled: dict[int, str] = {}
    order: list[str] = []
    completed: list[str] = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            scheduled[event.event_id] = name
            order.append(name)
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            completed.append(scheduled[event.activity_task_completed_event_attributes.scheduled_event_id])
    return order, completed


@pytest.mark.asyncio(loop_scope="session")
async def test_the_reconciliation_runs_while_loki_is_slow_and_the_plan_waits_for_its_answer(
    held: tuple[World, HeldLoki],
) -> None:
    world, loki = held
    incident = await incident_in(world, "worker-crash", "rb")
    handle = await start(
        world,
        RemediationRequest(
            correlation_id=incident.correlation_id, trigger=Trigger.WORKER_FAILURE, requested_by="ic-dana"
        ),
    )

    async def reconciled_while_held() -> list[str] | None:
        _, completed = await _activities(handle)
        return completed if names.RECONCILE in completed else None

    completed = await eventually(reconciled_while_held, what="the reconciliation with Loki's answer held")
    assert loki.asked >= 1 and names.QUERY_CORRELATION_LOGS not in completed, completed
    await asyncio.sleep(1)  # time enough for a plan that did not wait
    scheduled, _ = await _activities(handle)
    assert names.BUILD_PLAN not in scheduled, scheduled
    run_id = (await handle.describe()).run_id
    assert await world.db.fetchval("SELECT count(*) FROM remediation.plans WHERE run_id = $1", run_id) == 0

    loki.released.set()
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert view.plan is not None and view.plan.action_count > 0
    scheduled, completed = await _activities(handle)
    # The plan came after every diagnosis check answered, Loki's last.
    assert completed.index(names.QUERY_CORRELATION_LOGS) < completed.index(names.BUILD_PLAN), completed
    assert {c.check for c in view.diagnosis} >= {"loki_logs", "data_consistency", "nats_consumer"}
