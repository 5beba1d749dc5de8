"""Helpers the end-to-end tests share: independent drift SQL, incidents, starts, approvals, polling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import pytest
from temporalio.client import Client, WorkflowExecution, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

import remediation_client as operations
from activities.nats_jetstream import NatsActivities
from config.approver_keys import sign
from contracts import names
from contracts.models import (
    ApprovalDecision,
    ConsumerSample,
    Phase,
    PlanSummary,
    RemediationRequest,
    RemediationResult,
    RunRef,
    Scope,
    StatusView,
    Trigger,
)
from local_platform.incidents import IncidentReport, run_incident
from local_platform.provider_payments import seeder_for
from tests.conftest import APPROVER_KEYS, World

T = TypeVar("T")


async def listed_runs(
    client: Client, workflow_id: str, *, at_least: int = 1, timeout: float = 30
) -> list[WorkflowExecution]:
    """Every run of ``workflow_id`` in the visibility list, once it lists ``at_least`` (lists catch up late)."""

    async def listed() -> list[WorkflowExecution] | None:
        runs = [wf async for wf in client.list_workflows(f'WorkflowId = "{workflow_id}"')]
        return runs if len(runs) >= at_least else None

    return await eventually(listed, timeout=timeout, what=f"{at_least} run(s) of {workflow_id} listed")


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    *,
    timeout: float = 30,
    interval: float = 0.2,
    what: str = "the condition",
) -> T:
    """Poll ``probe`` until it returns a truthy value and return it; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {value!r})")
        await asyncio.sleep(interval)


# Independent SQL (not the product's) for the four drift kinds.
DRIFT_SQL = {
    "missing_open": """SELECT a.id FROM billing.allocations a WHERE a.status IN ('active','releasing','release_failed')
                       AND a.id NOT IN (SELECT allocation_id FROM billing.usage_records WHERE end_time IS NULL)""",
    "orphan_open": """SELECT u.allocation_id FROM billing.usage_records u JOIN billing.allocations a
                      ON a.id = u.allocation_id WHERE u.end_time IS NULL AND a.status = 'released'""",
    "unbilled_closed": """SELECT u.allocation_id FROM billing.usage_records u WHERE u.end_time IS NOT NULL
                          AND u.accrued_cost_minor > 0 AND u.id NOT IN
                          (SELECT usage_record_id FROM billing.ledger_entries WHERE usage_record_id IS NOT NULL)""",
    # A session the provider never captured ends 'failed' with no ledger entry: that is not drift.
    "payment_drift": """SELECT id FROM billing.payment_sessions WHERE status = 'failed_reconcile'
                        OR (status = 'completed' AND ledger_entry_id IS NULL)""",
}


async def drift(world: World) -> dict[str, set[str]]:
    return {k: {r[0] for r in await world.db.fetch(sql)} for k, sql in DRIFT_SQL.items()}


async def ledger_state(world: World) -> tuple[Any, ...]:
    return tuple(
        await world.db.fetch(
            "SELECT id, amount_minor, idempotency_key FROM billing.ledger_entries ORDER BY id"
        )
    )


async def assert_ledger_is_the_plan(world: World, plan: PlanSummary) -> None:
    """The ledger ends exactly as approved: every action audited once, no key twice, no drift left but
    the payments handed to the payments team (never applied)."""
    rows = await world.db.fetch(
        """SELECT a.seq, a.outcome, p.kind, p.entity_id FROM remediation.applied_actions a
           JOIN remediation.plan_actions p USING (plan_id, seq) WHERE a.plan_id = $1""",
        plan.plan_id,
    )
    assert len(rows) == len({r["seq"] for r in rows})
    # API actions (restriction clear, worker restart) are audited in the same table.
    assert len(rows) == plan.action_count, (len(rows), plan)
    outcomes = {(r["kind"] == "investigate_payment", r["outcome"]) for r in rows}
    assert outcomes <= {(False, "applied"), (True, "follow_up")}, outcomes
    investigated = {r["entity_id"] for r in rows if r["kind"] == "investigate_payment"}
    duplicates = await world.db.fetchval(
        "SELECT count(*) - count(DISTINCT idempotency_key) FROM billing.ledger_entries"
    )
    assert duplicates == 0
    posted = await world.db.fetchval(
        "SELECT coalesce(sum(amount_minor), 0) FROM billing.ledger_entries WHERE actor LIKE 'remediation:%'"
    )
    assert posted == plan.debit_total_minor + plan.credit_total_minor
    left = await drift(world)
    assert left == {k: set() for k in DRIFT_SQL} | {"payment_drift": investigated}, (left, investigated)


async def wait_phase(handle: WorkflowHandle[Any, Any], phases: set[Phase], timeout: float = 90) -> StatusView:
    """The status view once the run is in one of ``phases``."""

    async def reached() -> StatusView | None:
        view: StatusView = await handle.query(names.QUERY_STATUS, result_type=StatusView)
        return view if view.phase in phases else None

    return await eventually(reached, timeout=timeout, what=f"{handle.id} to reach {sorted(phases)}")


async def start(world: World, request: RemediationRequest) -> WorkflowHandle[Any, RemediationResult]:
    started = await operations.start(world.client, world.settings, request)
    assert not started.attached, "a fresh start must not report attaching"
    return world.client.get_workflow_handle(
        started.workflow_id, run_id=started.run_id, result_type=RemediationResult
    )


async def incident_in(world: World, name: str, prefix: str) -> IncidentReport:
    async with world.db.acquire() as conn, seeder_for(world.settings) as provider:
        return await run_incident(name, conn, world.nc, prefix=prefix, provider=provider)


def request_for(incident: IncidentReport, **overrides: Any) -> RemediationRequest:
    """The remediation an incident commander would start for ``incident`` (its scope and trigger)."""
    fields: dict[str, Any] = {
        "correlation_id": incident.correlation_id,
        "trace_id": incident.trace_id,
        "scope": Scope(**incident.scope),
        "trigger": Trigger(incident.trigger),
        "requested_by": "ic-dana",
    }
    return RemediationRequest(**(fields | overrides))


async def start_dispute(
    world: World, prefix: str, *, dry_run: bool = False, requested_by: str = "ic-dana"
) -> tuple[IncidentReport, WorkflowHandle[Any, RemediationResult]]:
    """The user-dispute incident and a remediation started for its (org, user) scope."""
    incident = await incident_in(world, "user-dispute", prefix)
    handle = await start(world, request_for(incident, dry_run=dry_run, requested_by=requested_by))
    return incident, handle


async def approve(
    handle: WorkflowHandle[Any, Any], body: ApprovalDecision, update_id: str | None = None
) -> str:
    """Send an approval Update as the CLI does: retried while the plan is still opening."""
    return await operations.approve_when_open(handle, body, update_id or f"{body.approver}:{body.decision}")


async def approve_quorum(handle: WorkflowHandle[Any, Any], view: StatusView) -> None:
    """Approve the plan in ``view`` by as many of the tests' approvers as it needs."""
    for who in ("alice", "bob")[: view.approvals_needed]:
        await approve(handle, decision(view, who), f"approve-{who}")


async def refused(handle: WorkflowHandle[Any, Any], body: ApprovalDecision, match: str) -> None:
    with pytest.raises(WorkflowUpdateFailedError) as err:
        await handle.execute_update(names.UPDATE_APPROVE, body)
    assert isinstance(err.value.cause, ApplicationError)
    assert match in err.value.cause.message, err.value.cause.message


def decision(
    view: StatusView, approver: str, verdict: str = "approve", *, at: datetime | None = None
) -> ApprovalDecision:
    """A decision on the plan in ``view``, signed when ``approver`` is one of the tests' approvers."""
    assert view.plan is not None
    body = ApprovalDecision(
        plan_hash=view.plan.plan_hash,
        approver=approver,
        decision=verdict,
        comment="test",
        plan_id=view.plan.plan_id,
    )
    key = APPROVER_KEYS.get(approver)
    return sign(body, key, at=at) if key else body


class ConsumerSampler:
    """Samples the billing worker's consumer through the product's own activity (as verification does)."""

    def __init__(self, world: World) -> None:
        settings = world.settings
        self._acts = NatsActivities(
            settings.resolved_nats_url(),
            settings.billing_stream,
            settings.billing_consumer,
            settings.consumer_pending_threshold,
        )
        self._ref = RunRef(run_id="r", workflow_id="w", correlation_id="consumer-sample")

    async def sample(self) -> ConsumerSample:
        """One reading (the consumer exists in every test world)."""
        taken = ConsumerSample.of(await self._acts.check_consumer(self._ref))
        assert taken is not None
        return taken

    async def close(self) -> None:
        """Close the NATS connection."""
        await self._acts.close()


async def verify_evidence(world: World, workflow_id: str) -> list[str]:
    """`remediate verify-evidence`'s problems for the latest run of ``workflow_id`` ([] means verified)."""
    problems, _ = await operations.verify_evidence(world.settings, workflow_id)
    return problems
