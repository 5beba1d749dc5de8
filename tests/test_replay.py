"""Committed histories replay against today's workflow code; a non-deterministic change is caught."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from contracts import names
from contracts.models import RemediationRequest, RemediationResult
from tests.histories import load, recorded, replay_failure
from workflows.remediation import BillingRemediationWorkflow
from workflows.sandbox import workflow_runner

EXPECTED = {
    "approved_quorum",
    "dry_run",
    "expired",
    "rejected",
    "verification_failed_retry",
    "prepaid_launch_guard",
    "launch_guard_restricted",
    "reversal_full",
    "revoked_credit_reversed",
    # Recorded after the start's steps and the credits' re-check overlapped (patches overlapped-*).
    "approved_quorum_overlapped",
    "revoked_credit_reversed_overlapped",
    "verification_failed_retry_overlapped",
    # Recorded with the provider asked from the start, the blast radius beside the diagnosis, one
    # reconcile call on the first pass and the before-evidence after the plan (patches provider-prefetch,
    # blast-beside-diagnosis, one-reconcile-call, snapshot-after-plan).
    "approved_quorum_prefetch",
    "revoked_credit_reversed_prefetch",
    "verification_failed_retry_prefetch",
    # Recorded with the first pass reconciling beside the slower diagnosis checks and the plan's other
    # customers' balances read while it waits for approval (patches reconcile-beside-diagnosis,
    # balances-beside-approval).
    "approved_quorum_beside",
    "dry_run_beside",
    "revoked_credit_reversed_beside",
    "verification_failed_retry_beside",
}


def test_every_representative_run_is_recorded() -> None:
    assert {p.stem for p in recorded()} >= EXPECTED


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("path", recorded(), ids=lambda p: p.stem)
async def test_recorded_history_replays(path: Path) -> None:
    failure = await replay_failure(load(path))
    assert failure is None, f"{path.name}: {failure}"


@workflow.defn(name=names.WORKFLOW, sandboxed=False)
class ReorderedRemediation(BillingRemediationWorkflow):
    """A deliberately non-deterministic edit: an extra activity before the first recorded step."""

    @workflow.run
    async def run(self, request: RemediationRequest) -> RemediationResult:
        await workflow.execute_activity(
            names.RECORD_TIMELINE, "unexpected", start_to_close_timeout=timedelta(seconds=5)
        )
        return await super().run(request)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_nondeterministic_change_fails_replay() -> None:
    replayer = Replayer(
        workflows=[ReorderedRemediation],
        data_converter=pydantic_data_converter,
        workflow_runner=workflow_runner(),
    )
    for path in recorded():
        history = load(path)
        if history.events[0].workflow_execution_started_event_attributes.workflow_type.name != names.WORKFLOW:
            continue
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        assert result.replay_failure is not None, f"{path.name} replayed a changed workflow"
        assert "nondeterminism" in str(result.replay_failure).lower() or "TMPRL1100" in str(
            result.replay_failure
        )
