"""Upgrades under running remediations (issue 14): a run started on v1 keeps executing on a v1 worker
while a v2 worker, made current, takes the new runs. Worker Deployment Versioning on the dev server."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle
from temporalio.common import VersioningBehavior
from temporalio.testing import WorkflowEnvironment

from config import Settings
from contracts import names
from contracts.models import Phase, RemediationResult, StatusView
from tests.helpers import approve_quorum, incident_in, request_for, start, wait_phase
from worker.deployment import set_current_version
from worker.main import build_worker, resources

from .conftest import make_world


async def build_ids_of(handle: WorkflowHandle[Any, Any]) -> set[str]:
    """The build ids of the workers that completed the run's workflow tasks."""
    history = await handle.fetch_history()
    return {
        e.workflow_task_completed_event_attributes.deployment_version.build_id
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    }


@pytest.mark.asyncio(loop_scope="session")
async def test_a_run_started_on_v1_finishes_on_v1_while_v2_takes_new_runs(
    pg_settings: Settings, template_db: str, state_root: Path, temporal_env: WorkflowEnvironment
) -> None:
    deployment = f"remediation-test-{uuid.uuid4().hex[:8]}"
    async for world in make_world(
        pg_settings,
        template_db,
        state_root,
        temporal_env.client,
        in_process_worker=False,
        WORKER_VERSIONING="on",
        WORKER_DEPLOYMENT_NAME=deployment,
        WORKER_BUILD_ID="1.0",
    ):
        v1 = world.settings
        v2 = v1.model_copy(update={"worker_build_id": "2.0"})
        async with resources(v1) as res, build_worker(world.client, v1, res):
            await set_current_version(world.client, v1)
            old_incident = await incident_in(world, "user-dispute", "va")
            old = await start(world, request_for(old_incident))
            old_view = await wait_phase(old, {Phase.AWAITING_APPROVAL})
            # Deploy v2 next to v1 and make it current, while the v1 run waits for approval.
            async with build_worker(world.client, v2, res):
                assert await set_current_version(world.client, v2) == "2.0"
                new_incident = await incident_in(world, "user-dispute", "vb")
                new = await start(world, request_for(new_incident))
                new_view = await wait_phase(new, {Phase.AWAITING_APPROVAL})
                await approve_quorum(old, old_view)
                await approve_quorum(new, new_view)
                for handle in (old, new):
                    result = await handle.result()
                    assert isinstance(result, RemediationResult) and result.outcome is Phase.COMPLETED
                assert await build_ids_of(old) == {"1.0"}  # started on v1, finished on v1
                assert await build_ids_of(new) == {"2.0"}
                description = await old.describe()
                info = description.raw_description.workflow_execution_info.versioning_info
                assert info.behavior == VersioningBehavior.PINNED.value
                # The v1 run's status query is still answered (only a v1 worker may answer it).
                view = await old.query(names.QUERY_STATUS, result_type=StatusView)
                assert view.phase is Phase.COMPLETED and view.plan == old_view.plan
