"""Read a remediation: status, plan, list, evidence, stored plan actions."""

from __future__ import annotations

import json
import re
from typing import Any

import asyncpg
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError

from config import Settings
from contracts import names
from contracts.models import (
    PlanSummary,
    RemediationResult,
    StatusView,
    action_effect,
)
from database.plan_customers import customers, users
from remediation_client.errors import OperationError
from remediation_client.handles import check_workflow_id
from remediation_client.reversals import fetch_reversals
from workflows.search_attributes import SA_CORRELATION, SA_ORG, SA_PHASE


async def status(client: Client, workflow_id: str) -> StatusView:
    """The running (or last) remediation's status view."""
    handle = client.get_workflow_handle(check_workflow_id(workflow_id), result_type=RemediationResult)
    try:
        described = await handle.describe()
        if described.status == WorkflowExecutionStatus.COMPLETED:
            # An ended run's result carries its last status: no query replaying its history. Pinned to
            # the run described: a new run of the same scope may start in between.
            run = client.get_workflow_handle(
                workflow_id, run_id=described.run_id, result_type=RemediationResult
            )
            ended: RemediationResult = await run.result(follow_runs=False)
            if ended.status is not None:
                return ended.status
        view: StatusView = await handle.query(names.QUERY_STATUS, result_type=StatusView)
        return view
    except RPCError as err:
        raise OperationError(f"remediation {workflow_id!r}: {err.message}") from None


async def plan(client: Client, workflow_id: str) -> PlanSummary | None:
    """The plan currently awaiting approval."""
    return (await status(client, workflow_id)).plan


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


async def evidence(settings: Settings, workflow_id: str, *, reversals: bool = False) -> dict[str, Any]:
    """The stored evidence document of the latest run of ``workflow_id``; with ``reversals``, also the
    reversals of that run since (``reversed_by``: read now, outside the signed document)."""
    conn = await asyncpg.connect(settings.resolved_database_url())
    try:
        run_id, document = await latest_evidence(conn, workflow_id)
        if not reversals:
            return document
        found = await fetch_reversals(conn, run_id=run_id)
    finally:
        await conn.close()
    return document | {"reversed_by": [{k: v for k, v in r.items() if k != "created_at"} for r in found]}


async def latest_evidence(conn: asyncpg.Connection, workflow_id: str) -> tuple[str, dict[str, Any]]:
    """(run id, stored evidence document) of the latest run of ``workflow_id``."""
    check_workflow_id(workflow_id)
    row = await conn.fetchrow(
        """SELECT r.run_id, e.document FROM remediation.evidence e JOIN remediation.runs r USING (run_id)
           WHERE r.workflow_id = $1 ORDER BY r.started_at DESC LIMIT 1""",
        workflow_id,
    )
    if row is None:
        raise OperationError(f"no evidence for {workflow_id!r} (unknown id, or the run has not finished)")
    document: dict[str, Any] = json.loads(row["document"])
    return str(row["run_id"]), document


async def plan_actions(settings: Settings, plan_id: str, limit: int = 200) -> list[dict[str, Any]]:
    """The actions of a plan, as stored."""
    conn = await asyncpg.connect(settings.resolved_database_url())
    try:
        if await conn.fetchval("SELECT 1 FROM remediation.plans WHERE plan_id = $1", plan_id) is None:
            raise OperationError(f"plan {plan_id!r} does not exist")
        rows = await conn.fetch(
            """SELECT seq, kind, entity_type, entity_id, org_id, amount_minor, idempotency_key, params
               FROM remediation.plan_actions WHERE plan_id = $1 ORDER BY seq LIMIT $2""",
            plan_id,
            limit,
        )
    finally:
        await conn.close()
    actions = []
    for row in rows:
        action = dict(row)
        params = json.loads(action.pop("params") or "{}")
        action["effect"] = action_effect(action["kind"], params if isinstance(params, dict) else {})
        actions.append(action)
    return actions


async def customer_balances(
    settings: Settings, plan_id: str, limit: int = 20
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The orgs and the users a plan touches with their balance now and after the plan, the most money first."""
    conn = await asyncpg.connect(settings.resolved_database_url())
    try:
        return await customers(conn, plan_id, limit), await users(conn, plan_id, limit)
    finally:
        await conn.close()
