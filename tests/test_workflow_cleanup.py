"""A dropped run's coroutine, closed by garbage collection, issues no cleanup (no command in another run).

The worker drops an evicted run; Python later closes its coroutine wherever garbage collection happens,
possibly while another run's workflow code executes in that thread. A cleanup that ran then issued the
dropped run's first cleanup command (resolving its approver pages) inside the other run: a
nondeterminism error there (seen in CI on a `status` query, and in the replay tests after a test left
a run waiting for approval).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from temporalio import workflow

from contracts.models import Phase, RemediationRequest, Scope
from workflows.remediation import BillingRemediationWorkflow

pytestmark = pytest.mark.asyncio(loop_scope="session")


def suspended_run(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[str], asyncio.Future[None]]:
    """The workflow's run coroutine stepped (outside a worker) until it waits inside its remediation."""
    monkeypatch.setattr(workflow, "info", lambda: SimpleNamespace(run_id="r1", workflow_id="w1"))

    async def no_activity(*_: Any, **__: Any) -> None:
        return None

    monkeypatch.setattr(workflow, "execute_activity_method", no_activity)
    # The start's steps in turn (the patched overlap gathers them, which needs the workflow's loop).
    monkeypatch.setattr(workflow, "patched", lambda _: False)
    request = RemediationRequest(correlation_id="gc", scope=Scope(org_id="o1"), requested_by="ic")
    wf = BillingRemediationWorkflow(request)
    cleaned: list[str] = []
    forever: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def waiting(_: RemediationRequest) -> tuple[Phase, None, None]:
        await forever
        return Phase.COMPLETED, None, None

    async def cleanup(outcome: Phase, _: Any) -> None:
        cleaned.append(outcome.value)

    for name, replacement in {
        "_upsert_scope_attributes": lambda: None,
        "_audit_approvals": no_activity,
        "_act": no_activity,
        "_remediate": waiting,
        "_cleanup": cleanup,
    }.items():
        monkeypatch.setattr(wf, name, replacement)
    coro = wf.run(request)
    assert coro.send(None) is forever  # suspended inside the remediation, as a dropped run is
    return coro, cleaned, forever


async def test_a_run_closed_by_garbage_collection_issues_no_cleanup(monkeypatch: pytest.MonkeyPatch) -> None:
    coro, cleaned, _ = suspended_run(monkeypatch)
    coro.close()  # what garbage collection does to a dropped run's coroutine
    assert cleaned == []


async def test_a_cancelled_run_still_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    coro, cleaned, _ = suspended_run(monkeypatch)
    with pytest.raises(asyncio.CancelledError):
        coro.throw(asyncio.CancelledError())
    assert cleaned == [Phase.CANCELLED.value]


async def test_a_failed_run_still_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    coro, cleaned, _ = suspended_run(monkeypatch)
    with pytest.raises(RuntimeError):
        coro.throw(RuntimeError("activity failed"))
    assert cleaned == [Phase.FAILED.value]
