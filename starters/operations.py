"""What the commander's and approvers' commands do, as plain async functions (the CLI only formats)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from opentelemetry import trace
from pydantic import ValidationError
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from config import Settings
from config.approver_keys import ApproverKeyError, load_private_key, sign
from database.approvals import record_approval_row
from database.scope import ScopeRefused, validate_scope
from workflows import names
from workflows.approval import NOT_OPEN
from workflows.input_errors import explain, shown
from workflows.launch_guard import LaunchGuardWorkflow
from workflows.models import (
    ApprovalDecision,
    ApprovalRecord,
    LaunchGuardReport,
    LaunchGuardVerifyRequest,
    PlanSummary,
    RemediationRequest,
    StatusView,
    VerdictDecision,
)
from workflows.remediation import STEPS_MARKDOWN, BillingRemediationWorkflow
from workflows.search_attributes import SA_CORRELATION, SA_ORG, SA_PHASE, scope_values

log = logging.getLogger("billing_remediation.cli")
_tracer = trace.get_tracer("billing_remediation.cli")
# An approval sent while the plan is still opening (or reopening after an escalation) is retried.
NOT_OPEN_RETRIES = 20
NOT_OPEN_RETRY_SECONDS = 0.5
WORKFLOW_ID = re.compile(r"^remediation-[A-Za-z0-9._:/\-]{1,200}$")


class OperationError(RuntimeError):
    """A command could not be carried out; the message says what is wrong."""


@dataclass
class Started:
    """Result of `start`."""

    workflow_id: str
    run_id: str
    attached: bool
    ui_link: str
    trace_id: str | None = None  # the remediation's own trace, when tracing is exported


def check_workflow_id(workflow_id: str) -> str:
    """Refuse malformed remediation ids before any call."""
    if not WORKFLOW_ID.fullmatch(workflow_id):
        raise OperationError(f"malformed remediation id {workflow_id!r}: expected 'remediation-<scope>'")
    return workflow_id


async def preflight(settings: Settings, request: RemediationRequest) -> None:
    """Check the scope against the billing data before anything starts."""
    conn = await asyncpg.connect(settings.resolved_database_url())
    try:
        await validate_scope(conn, request.scope)
    except ScopeRefused as err:
        raise OperationError(str(err)) from None
    finally:
        await conn.close()


async def start(client: Client, settings: Settings, request: RemediationRequest) -> Started:
    """Start a remediation, or attach to the one already running for the same scope."""
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
        handle = await client.start_workflow(
            BillingRemediationWorkflow.run,
            request,
            id=request.workflow_id(),
            task_queue=settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            search_attributes=TypedSearchAttributes(pairs),
            static_summary=summary[:400],
            static_details=STEPS_MARKDOWN,
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
            LaunchGuardWorkflow.run,
            request,
            id=workflow_id,
            task_queue=settings.task_queue,
            static_summary=f"launch guard · expect {request.expect} · {where} · corr {request.correlation_id}"
            f" · by {request.requested_by}",
        )
    except WorkflowFailureError as err:
        raise OperationError(
            f"launch guard verification {workflow_id} failed: {_root_message(err)}"
        ) from None
    return workflow_id, report


def _root_message(err: BaseException) -> str:
    """The innermost cause's message (an activity's or the workflow's own ApplicationError)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return getattr(err, "message", None) or str(err)


async def _is_running(client: Client, workflow_id: str) -> bool:
    try:
        description = await client.get_workflow_handle(workflow_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return description.status == WorkflowExecutionStatus.RUNNING


def handle_for(client: Client, workflow_id: str) -> WorkflowHandle[Any, Any]:
    """Handle of a remediation by id (validated)."""
    return client.get_workflow_handle(check_workflow_id(workflow_id))


async def status(client: Client, workflow_id: str) -> StatusView:
    """The running (or last) remediation's status view."""
    try:
        view: StatusView = await handle_for(client, workflow_id).query(
            names.QUERY_STATUS, result_type=StatusView
        )
        return view
    except RPCError as err:
        raise OperationError(f"remediation {workflow_id!r}: {err.message}") from None


async def plan(client: Client, workflow_id: str) -> PlanSummary | None:
    """The plan currently awaiting approval."""
    return (await status(client, workflow_id)).plan


async def decide_plan(
    client: Client,
    settings: Settings,
    workflow_id: str,
    *,
    plan_hash: str,
    approver: str,
    decision: str,
    comment: str,
    key_path: Path | None = None,
) -> str:
    """Sign and send an approval/rejection as a validated Update; a refusal is audited and raised."""
    view = await status(client, workflow_id)
    handle = handle_for(client, workflow_id)
    try:
        plan_hash = resolve_plan_hash(plan_hash, view)
    except PlanRefused as refused:
        # Refused before it reaches the workflow, and audited like every refusal the workflow makes.
        run_id = (await handle.describe()).run_id
        record = ApprovalRecord(
            run_id=run_id,
            event_key=f"{run_id}:refused:{uuid.uuid4()}",
            plan_id=view.plan.plan_id if view.plan else None,
            plan_hash=plan_hash.strip()[:64] or None,
            approver=approver[:128],
            decision=decision,
            comment=comment[:2000],
            accepted=False,
            refusal_reason=str(refused),
            via="update",
        )
        await _audit_refusal(settings, record)
        raise OperationError(f"refused: {refused}") from None
    try:
        body = ApprovalDecision(
            plan_hash=plan_hash,
            approver=approver,
            decision=decision,
            comment=comment,
            plan_id=view.plan.plan_id if view.plan else None,
        )
    except ValidationError as err:
        raise OperationError(f"invalid approval: {explain(err)}") from None
    path = key_path or settings.resolved_keys_dir() / f"{approver}.key"
    # Without a key file the decision goes unsigned: the workflow's refusal then says why, and is audited.
    if settings.approval_signatures == "required" and (key_path is not None or path.exists()):
        try:
            body = sign(body, load_private_key(path))
        except ApproverKeyError as err:
            raise OperationError(f"cannot sign as {approver}: {err}") from None
    context = {"workflow_id": workflow_id, "actor": approver, "phase": view.phase.value}
    try:
        answer = await approve_when_open(handle, body, f"{decision}:{plan_hash[:16]}:{approver}")
    except WorkflowUpdateFailedError as err:
        reason = err.cause.message if isinstance(err.cause, ApplicationError) else str(err.cause)
        # Temporal keeps no record of a rejected Update: the refusal is audited here.
        run_id = (await handle.describe()).run_id
        record = ApprovalRecord.of(
            body,
            run_id=run_id,
            event_key=f"{run_id}:refused:{uuid.uuid4()}",
            plan_id=view.plan.plan_id if view.plan else None,
            refusal_reason=reason,
            via="update",
        )
        await _audit_refusal(settings, record)
        log.warning("%s of plan %s refused: %s", decision, plan_hash[:12], reason, extra=context)
        raise OperationError(f"refused: {reason}") from None
    except RPCError as err:
        raise OperationError(f"remediation {workflow_id!r}: {err.message}") from None
    log.info("%s of plan %s accepted: %s", decision, plan_hash[:12], answer, extra=context)
    return answer


async def approve_when_open(handle: WorkflowHandle[Any, Any], body: ApprovalDecision, update_id: str) -> str:
    """Send the approval Update, retrying while the plan is only about to open (a transient refusal)."""
    for attempt in range(NOT_OPEN_RETRIES + 1):
        try:
            return str(await handle.execute_update(names.UPDATE_APPROVE, body, id=update_id, result_type=str))
        except WorkflowUpdateFailedError as err:
            opening = isinstance(err.cause, ApplicationError) and err.cause.message == NOT_OPEN
            if not opening or attempt == NOT_OPEN_RETRIES:
                raise
        await asyncio.sleep(NOT_OPEN_RETRY_SECONDS)
    raise AssertionError("unreachable: the last attempt returns or raises")


async def _audit_refusal(settings: Settings, record: ApprovalRecord) -> None:
    conn = await asyncpg.connect(settings.resolved_database_url())
    try:
        await record_approval_row(conn, record)
    finally:
        await conn.close()


class PlanRefused(ValueError):
    """The --plan given cannot name the plan awaiting approval."""


MIN_PREFIX = 8


def resolve_plan_hash(given: str, view: StatusView) -> str:
    """The full hash of the plan awaiting approval that ``given`` (the hash or a prefix) names."""
    text = given.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{1,64}", text):
        raise PlanRefused(
            f"--plan must be the plan hash or a prefix of at least {MIN_PREFIX} of its hexadecimal "
            f"characters (got {shown(given)})"
        )
    if len(text) < MIN_PREFIX:
        raise PlanRefused(
            f"plan hash prefix {text!r} is too short to be unambiguous: give at least {MIN_PREFIX} characters"
        )
    if view.plan is None:
        raise PlanRefused(f"no plan awaits approval (phase {view.phase.value})")
    current = view.plan.plan_hash
    if not current.startswith(text):
        raise PlanRefused(
            f"stale plan: the plan awaiting approval is {current[:12]}…, not {text[:12]}…;"
            " review it with `remediate plan` before deciding"
        )
    return current


async def decide_verdict(client: Client, workflow_id: str, *, actor: str, choice: str, comment: str) -> str:
    """After a failed verification: retry or hand off."""
    try:
        answer = str(
            await handle_for(client, workflow_id).execute_update(
                names.UPDATE_DECIDE,
                VerdictDecision(actor=actor, choice=choice, comment=comment),
                result_type=str,
            )
        )
    except WorkflowUpdateFailedError as err:
        reason = err.cause.message if isinstance(err.cause, ApplicationError) else str(err.cause)
        raise OperationError(f"refused: {reason}") from None
    log.info("verdict %s: %s", choice, answer, extra={"workflow_id": workflow_id, "actor": actor})
    return answer


async def abort(client: Client, workflow_id: str) -> None:
    """Cancel the remediation; the workflow lifts its freeze and captures evidence on the way out."""
    try:
        await handle_for(client, workflow_id).cancel()
    except RPCError as err:
        raise OperationError(f"remediation {workflow_id!r}: {err.message}") from None
    log.info("remediation %s cancelled", workflow_id, extra={"workflow_id": workflow_id})


async def list_runs(client: Client, query: str, limit: int = 50) -> list[dict[str, Any]]:
    """Remediations matching a visibility query."""
    rows: list[dict[str, Any]] = []
    async for wf in client.list_workflows(query or None, limit=limit):
        sa = wf.typed_search_attributes
        rows.append(
            {
                "workflow_id": wf.id,
                "status": wf.status.name if wf.status else "?",
                "phase": sa.get(SA_PHASE),
                "org": sa.get(SA_ORG),
                "correlation_id": sa.get(SA_CORRELATION),
                "started": wf.start_time.isoformat() if wf.start_time else "",
            }
        )
    return rows


def list_query(*, phase: str | None, org: str | None, correlation_id: str | None) -> str:
    """Visibility query for `remediate list` (values quoted safely)."""
    clauses = [f"WorkflowType = '{names.WORKFLOW}'"]
    for attribute, value in (
        (SA_PHASE.name, phase),
        (SA_ORG.name, org),
        (SA_CORRELATION.name, correlation_id),
    ):
        if value is not None:
            if not re.fullmatch(r"[A-Za-z0-9._:\-]{1,128}", value):
                raise OperationError(f"--{attribute}: malformed value {value!r}")
            clauses.append(f"{attribute} = '{value}'")
    return " AND ".join(clauses)


async def evidence(settings: Settings, workflow_id: str) -> dict[str, Any]:
    """The stored evidence document of the latest run of ``workflow_id``."""
    check_workflow_id(workflow_id)
    conn = await asyncpg.connect(settings.resolved_database_url())
    try:
        row = await conn.fetchrow(
            """SELECT e.document FROM remediation.evidence e JOIN remediation.runs r USING (run_id)
               WHERE r.workflow_id = $1 ORDER BY r.started_at DESC LIMIT 1""",
            workflow_id,
        )
    finally:
        await conn.close()
    if row is None:
        raise OperationError(f"no evidence for {workflow_id!r} (unknown id, or the run has not finished)")
    document: dict[str, Any] = json.loads(row["document"])
    return document


async def plan_actions(settings: Settings, plan_id: str, limit: int = 200) -> list[dict[str, Any]]:
    """The actions of a plan, as stored."""
    conn = await asyncpg.connect(settings.resolved_database_url())
    try:
        if await conn.fetchval("SELECT 1 FROM remediation.plans WHERE plan_id = $1", plan_id) is None:
            raise OperationError(f"plan {plan_id!r} does not exist")
        rows = await conn.fetch(
            """SELECT seq, kind, entity_type, entity_id, org_id, amount_minor, idempotency_key
               FROM remediation.plan_actions WHERE plan_id = $1 ORDER BY seq LIMIT $2""",
            plan_id,
            limit,
        )
    finally:
        await conn.close()
    return [dict(r) for r in rows]
