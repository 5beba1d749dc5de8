"""Start or attach to a remediation, verify the launch guard, abort: the commander's writes."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
from opentelemetry import trace
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from config import Settings
from contracts import names
from contracts.models import (
    AlertNotice,
    LaunchGuardReport,
    LaunchGuardVerifyRequest,
    RemediationRequest,
    RemediationResult,
)
from database.scope import ScopeRefused, validate_scope
from remediation_client.errors import OperationError, root_message
from remediation_client.handles import handle_for
from workflows.details import STEPS_MARKDOWN
from workflows.search_attributes import scope_values

log = logging.getLogger("billing_remediation.cli")
_tracer = trace.get_tracer("billing_remediation.cli")


@dataclass
class Started:
    """Result of `start`."""

    workflow_id: str
    run_id: str
    attached: bool
    ui_link: str
    trace_id: str | None = None  # the remediation's own trace, when tracing is exported


async def preflight(settings: Settings, request: RemediationRequest) -> None:
    """Check the scope against the billing data before anything starts."""
    conn = await asyncpg.connect(settings.resolved_database_url())
    try:
        await validate_scope(conn, request.scope)
    except ScopeRefused as err:
        raise OperationError(str(err)) from None
    finally:
        await conn.close()


async def start(
    client: Client, settings: Settings, request: RemediationRequest, notice: AlertNotice | None = None
) -> Started:
    """Start a remediation, or attach to the one already running for the same scope.

    With ``notice`` (an alert, the drift watch's finding) it is one signal-with-start: the notice is
    recorded on the run that exists then, started or not, with no window between the two.
    """
    scope = request.scope
    pairs: list[SearchAttributePair[Any]] = [
        SearchAttributePair(key, value)
        for key, value in scope_values(request.correlation_id, request.trigger.value, scope)
    ]
    mode = "dry run" if request.dry_run else "remediate after approval"
    summary = (
        f"{request.trigger.value} · corr {request.correlation_id} · {scope.describe()} · {mode}"
        f" · by {request.requested_by}"
    )
    # USE_EXISTING returns the running execution; look first so the commander is told it was attached.
    attached = await _is_running(client, request.workflow_id())
    # The start's span is the root of the remediation's trace (the worker's spans hang under it).
    with _tracer.start_as_current_span(
        "remediate start",
        attributes={"correlation_id": request.correlation_id, "actor": request.requested_by},
    ) as span:
        # By name: a client never loads the workflow module (it imports the activities it calls).
        together: dict[str, Any] = (
            {"start_signal": names.SIGNAL_ALERT, "start_signal_args": [notice]}
            if notice is not None
            else {"id_conflict_policy": WorkflowIDConflictPolicy.USE_EXISTING}
        )
        handle = await client.start_workflow(
            names.WORKFLOW,
            request,
            result_type=RemediationResult,
            id=request.workflow_id(),
            task_queue=settings.task_queue,
            search_attributes=TypedSearchAttributes(pairs),
            static_summary=summary[:400],
            static_details=STEPS_MARKDOWN,
            **together,
        )
    run_id = handle.result_run_id or (await handle.describe()).run_id
    context = span.get_span_context()
    trace_id = format(context.trace_id, "032x") if context.is_valid and not attached else None
    log.info(
        "remediation %s %s",
        handle.id,
        "attached" if attached else "started",
        extra={
            "correlation_id": request.correlation_id,
            "workflow_id": handle.id,
            "actor": request.requested_by,
        },
    )
    return Started(handle.id, run_id, attached, settings.workflow_ui_link(handle.id), trace_id)


async def verify_launch_guard(
    client: Client, settings: Settings, request: LaunchGuardVerifyRequest
) -> tuple[str, LaunchGuardReport]:
    """Run the launch-restriction verification to its verdict; returns the workflow id and the report."""
    where = request.org_id + (f"-{request.project_id}" if request.project_id else "")
    workflow_id = f"launch-guard-{where}-{uuid.uuid4().hex[:8]}"
    try:
        report = await client.execute_workflow(
            names.LAUNCH_GUARD_WORKFLOW,
            request,
            result_type=LaunchGuardReport,
            id=workflow_id,
            task_queue=settings.task_queue,
            static_summary=f"launch guard · expect {request.expect} · {where} · corr {request.correlation_id}"
            f" · by {request.requested_by}",
        )
    except WorkflowFailureError as err:
        raise OperationError(f"launch guard verification {workflow_id} failed: {root_message(err)}") from None
    return workflow_id, report


async def _is_running(client: Client, workflow_id: str) -> bool:
    try:
        description = await client.get_workflow_handle(workflow_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return description.status == WorkflowExecutionStatus.RUNNING


async def abort(client: Client, workflow_id: str) -> None:
    """Cancel the remediation; the workflow lifts its freeze and captures evidence on the way out."""
    try:
        await handle_for(client, workflow_id).cancel()
    except RPCError as err:
        raise OperationError(f"remediation {workflow_id!r}: {err.message}") from None
    log.info("remediation %s cancelled", workflow_id, extra={"workflow_id": workflow_id})
