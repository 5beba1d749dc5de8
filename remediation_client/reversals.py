"""Reversals from the client side: the request that takes back a finished run, and who reversed a run."""

from __future__ import annotations

from typing import Any

import asyncpg
from pydantic import ValidationError

from config import Settings
from contracts.models import RemediationRequest, ReversalTarget, Scope, Trigger
from remediation_client.errors import OperationError
from remediation_client.handles import check_workflow_id


async def reversal_request(
    settings: Settings,
    workflow_id: str,
    *,
    scope: Scope | None,
    reason: str,
    requested_by: str,
    run_id: str | None = None,
    dry_run: bool = False,
) -> RemediationRequest:
    """The reversal of ``workflow_id``'s latest finished run (or ``run_id``), under the run's correlation id.

    Without ``scope`` it reverses the whole run (the run's own scope); with one, only that part of it.
    """
    check_workflow_id(workflow_id)
    conn = await asyncpg.connect(settings.resolved_database_url())
    try:
        run = await conn.fetchrow(
            """SELECT run_id, correlation_id, trigger, ended_at, scope::text AS scope FROM remediation.runs
               WHERE workflow_id = $1 AND ($2::text IS NULL OR run_id = $2) AND NOT dry_run
               ORDER BY started_at DESC LIMIT 1""",
            workflow_id,
            run_id,
        )
    finally:
        await conn.close()
    if run is None:
        which = f"run {run_id!r} of " if run_id else ""
        raise OperationError(
            f"nothing to reverse: no {which}remediation {workflow_id!r} that applied changes"
        )
    if run["ended_at"] is None:
        raise OperationError(
            f"remediation {workflow_id!r} (run {run['run_id']}) is still running: wait for it to end, or abort it"
        )
    if run["trigger"] == Trigger.REVERSAL.value:
        raise OperationError(
            f"{workflow_id!r} is itself a reversal: start a remediation to change money again"
        )
    try:
        return RemediationRequest(
            correlation_id=run["correlation_id"],
            trigger=Trigger.REVERSAL,
            scope=scope if scope is not None else Scope.model_validate_json(run["scope"]),
            requested_by=requested_by,
            dry_run=dry_run,
            reverses=ReversalTarget(workflow_id=workflow_id, run_id=run["run_id"], reason=reason),
        )
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in err.errors())
        raise OperationError(f"invalid reversal: {problems}") from None


# Reversals of a run that took something back, or are still running (an ended one that applied nothing,
# such as a repeat or a dry run, reversed nothing and is not listed).
REVERSALS = """SELECT v.workflow_id, v.run_id, v.original_run_id, v.scope::text AS scope, v.reason, v.requested_by,
                      r.outcome, v.created_at
               FROM remediation.reversals v JOIN remediation.runs r ON r.run_id = v.run_id
               WHERE {where} = $1 AND NOT r.dry_run
                 AND (r.ended_at IS NULL OR EXISTS (
                      SELECT 1 FROM remediation.plans p JOIN remediation.applied_actions aa ON aa.plan_id = p.plan_id
                      WHERE p.run_id = v.run_id AND aa.outcome = 'applied'))
               ORDER BY v.created_at"""


async def fetch_reversals(
    conn: asyncpg.Connection, *, workflow_id: str = "", run_id: str = ""
) -> list[dict[str, Any]]:
    """The reversals of a run (``run_id``) or of any run of ``workflow_id``, with their extent in words."""
    where, value = ("v.original_run_id", run_id) if run_id else ("v.original_workflow_id", workflow_id)
    found = []
    for row in await conn.fetch(REVERSALS.format(where=where), value):
        item = dict(row)
        scope = Scope.model_validate_json(item["scope"])
        item["scope"] = scope.model_dump()
        item["extent"] = "in full" if scope.is_global else f"in part ({scope.describe()})"
        found.append(item)
    return found


async def reversals_of(settings: Settings, workflow_id: str) -> list[dict[str, Any]]:
    """Every reversal of any run of ``workflow_id``: who, why, in full or in part, and how it ended."""
    conn = await asyncpg.connect(settings.resolved_database_url())
    try:
        return await fetch_reversals(conn, workflow_id=workflow_id)
    finally:
        await conn.close()


def reversed_by_words(reversals: list[dict[str, Any]]) -> list[str]:
    """One line per reversal of a run, for `status` and `evidence`."""
    return [
        f"reversed by {r['workflow_id']} {r['extent']}: {r['outcome'] or 'running'};"
        f" requested by {r['requested_by']}: {r['reason']}"
        for r in reversals
    ]
