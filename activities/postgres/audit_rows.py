"""The apply's audit rows: one statement per batch of rows (one audit-chain link), in the effect's transaction."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from contracts.models import ApplyOutcome, ApplyRequest

# A batch's plan rows: ``$1`` the plan id, ``$2`` their seqs (one definition for every batch statement).
PLANNED = "(SELECT p.* FROM remediation.plan_actions p WHERE p.plan_id = $1 AND p.seq = ANY($2::int[]))"

# One audited action: the plan row, its outcome, and its before and after (documents or JSON text).
AuditRow = tuple[asyncpg.Record, ApplyOutcome, Any, Any]


def _doc(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


async def write_audit_rows(conn: asyncpg.Connection, request: ApplyRequest, rows: list[AuditRow]) -> None:
    """Audit rows in one statement (one audit-chain link), in the caller's transaction."""
    if not rows:
        return
    await conn.execute(
        """INSERT INTO remediation.applied_actions (plan_id, seq, idempotency_key, kind, outcome, actor, approvers,
               workflow_id, correlation_id, before, after)
           SELECT $1, r.seq, r.key, r.kind, r.outcome, $2, $3, $4, $5, r.before::jsonb, r.after::jsonb
           FROM unnest($6::int[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[])
                AS r(seq, key, kind, outcome, before, after)
           ORDER BY r.seq
           ON CONFLICT (plan_id, seq) DO NOTHING""",
        request.plan_id,
        request.actor,
        request.approvers,
        request.ref.workflow_id,
        request.ref.correlation_id,
        [a["seq"] for a, *_ in rows],
        [a["idempotency_key"] for a, *_ in rows],
        [a["kind"] for a, *_ in rows],
        [o.value for _, o, *_ in rows],
        [_doc(b) for _, _, b, _ in rows],
        [_doc(x) for *_, x in rows],
    )
