"""Approve, reject and decide: signed Updates, refusals audited here (Temporal keeps no record of them)."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import ValidationError
from temporalio.client import (
    Client,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from config import Settings
from config.approver_keys import ApproverKeyError, load_private_key, sign
from contracts import names
from contracts.models import (
    ApprovalDecision,
    ApprovalRecord,
    StatusView,
    VerdictDecision,
)
from database.approvals import record_approval_row
from remediation_client.errors import OperationError, update_refusal
from remediation_client.handles import handle_for
from remediation_client.reads import status
from workflows.approval import NOT_OPEN
from workflows.input_errors import explain, shown

log = logging.getLogger("billing_remediation.cli")
# An approval sent while the plan is still opening (or reopening after an escalation) is retried.
NOT_OPEN_RETRIES = 20
NOT_OPEN_RETRY_SECONDS = 0.5


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
        # Not validated: the refusal is audited with what was given, whatever it was.
        body = ApprovalDecision.model_construct(
            plan_hash=plan_hash.strip()[:64], approver=approver, decision=decision,  # type: ignore[arg-type]
            comment=comment, plan_id=None, client="cli",
        )  # fmt: skip
        raise await _refused(settings, handle, body, str(refused)) from None
    try:
        body = ApprovalDecision(
            plan_hash=plan_hash,
            approver=approver,
            decision=decision,
            comment=comment,
            plan_id=view.plan.plan_id if view.plan else None,
            client="cli",
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
    return await submit_decision(client, settings, workflow_id, body, view=view)


async def submit_decision(
    client: Client,
    settings: Settings,
    workflow_id: str,
    body: ApprovalDecision,
    *,
    view: StatusView | None = None,
) -> str:
    """Send a (signed) decision as the validated Update, from the CLI or the approval page alike.

    A refusal (stale plan, not an approver, self-approval, bad signature, ...) is audited in
    ``remediation.approvals`` and raised as an OperationError carrying the workflow's reason.
    """
    view = view or await status(client, workflow_id)
    handle = handle_for(client, workflow_id)
    approver, decision, plan_hash = body.approver, body.decision, body.plan_hash
    context = {"workflow_id": workflow_id, "actor": approver, "phase": view.phase.value}
    try:
        answer = await approve_when_open(handle, body, f"{decision}:{plan_hash[:16]}:{approver}")
    except WorkflowUpdateFailedError as err:
        reason = update_refusal(err)
        log.warning("%s of plan %s refused: %s", decision, plan_hash[:12], reason, extra=context)
        raise await _refused(settings, handle, body, reason) from None
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


async def _refused(
    settings: Settings, handle: WorkflowHandle[Any, Any], body: ApprovalDecision, reason: str
) -> OperationError:
    """Audit a refused decision (Temporal keeps no record of a refused Update) and say why.

    The row names what the approver signed or gave (plan id and hash), never the plan now awaiting
    approval: a refused stale approval of plan p0 must not read as a decision about p1.
    """
    run_id = (await handle.describe()).run_id
    plan_hash = body.plan_hash.strip()[:64]
    conn = await asyncpg.connect(settings.resolved_database_url())
    try:
        plan_id = body.plan_id
        if plan_id is None and re.fullmatch(r"[0-9a-f]{8,64}", plan_hash):
            # The CLI took a hash (or prefix) only: the plan of this run it names, if any.
            plan_id = await conn.fetchval(
                "SELECT plan_id FROM remediation.plans WHERE run_id = $1 AND plan_hash LIKE $2 || '%' LIMIT 1",
                run_id,
                plan_hash,
            )
        record = ApprovalRecord(
            run_id=run_id,
            event_key=f"{run_id}:refused:{uuid.uuid4()}",
            plan_id=plan_id,
            plan_hash=plan_hash or None,
            approver=body.approver[:128],
            decision=body.decision,
            comment=body.comment[:2000],
            accepted=False,
            refusal_reason=reason,
            via=f"update from {body.client.replace('_', ' ')}" if body.client else "update",
        )
        await record_approval_row(conn, record)
    finally:
        await conn.close()
    return OperationError(f"refused: {reason}")


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
        raise OperationError(f"refused: {update_refusal(err)}") from None
    log.info("verdict %s: %s", choice, answer, extra={"workflow_id": workflow_id, "actor": actor})
    return answer
