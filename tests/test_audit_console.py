"""What an auditor sees in the Temporal UI, checked through Temporal's own API (describe, list, metadata)."""

from __future__ import annotations

import pytest
from temporalio.api.sdk.v1 import WorkflowMetadata

import remediation_client as operations
from contracts import names
from contracts.models import Phase, Scope
from tests.conftest import World
from tests.helpers import decision, eventually, start_dispute, wait_phase
from workflows.search_attributes import (
    SA_APPROVAL,
    SA_BLAST,
    SA_CORRELATION,
    SA_ORG,
    SA_PHASE,
    SA_TRIGGER,
    SA_USER,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_summary_details_and_search_attributes_tell_the_story(world: World) -> None:
    incident, handle = await start_dispute(world, "au")
    scope = Scope(**incident.scope)
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    # While waiting: listed by phase and org; live details show the plan and pending approvals.
    query = operations.list_query(phase="awaiting_approval", org=scope.org_id, correlation_id=None)
    # Visibility is eventually consistent.
    listed = await eventually(lambda: operations.list_runs(world.client, query), what="the listed run")
    assert [r["workflow_id"] for r in listed] == [handle.id]
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    details = metadata.current_details
    assert "Phase: `awaiting_approval`" in details
    assert view.plan is not None and view.plan.plan_hash[:12] in details
    assert "Approvals: none (0/1)" in details

    await handle.execute_update(names.UPDATE_APPROVE, decision(view, "alice"))
    await handle.result()
    desc = await handle.describe()
    summary = await desc.static_summary()
    assert summary is not None
    for words in (
        "customer_dispute",
        incident.correlation_id,
        str(scope.user_id),
        "remediate after approval",
        "ic-dana",
    ):
        assert words in summary, (words, summary)
    static_details = await desc.static_details()
    assert (
        static_details is not None
        and "Runbook" in static_details
        and "Verify the recovery criteria" in static_details
    )
    attrs = desc.typed_search_attributes
    assert attrs.get(SA_CORRELATION) == incident.correlation_id
    assert attrs.get(SA_ORG) == scope.org_id and attrs.get(SA_USER) == scope.user_id
    assert attrs.get(SA_TRIGGER) == "customer_dispute"
    assert attrs.get(SA_PHASE) == "completed" and attrs.get(SA_APPROVAL) == "approved"
    assert attrs.get(SA_BLAST) == "single"
    # Every activity call carries a summary in words (what the UI timeline shows).
    history = await handle.fetch_history()
    scheduled = [e for e in history.events if e.HasField("activity_task_scheduled_event_attributes")]
    assert scheduled and all(e.user_metadata.HasField("summary") for e in scheduled)
    final = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    assert "Verification: PASSED" in final.current_details
    done = await eventually(
        lambda: operations.list_runs(
            world.client,
            operations.list_query(phase="completed", org=None, correlation_id=incident.correlation_id),
        ),
        what="the completed run listed",
    )
    assert [r["workflow_id"] for r in done] == [handle.id]
