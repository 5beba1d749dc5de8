"""The approvals audit row (accepted or refused), written by the workflow's activity and by clients
for refusals Temporal keeps no record of."""

from __future__ import annotations

import asyncpg

from contracts.models import ApprovalRecord
from database.timeline import insert_timeline


async def record_approval_row(pool: asyncpg.Pool | asyncpg.Connection, record: ApprovalRecord) -> None:
    """Audit one approval attempt (accepted or refused); idempotent per event key."""
    await pool.execute(
        """INSERT INTO remediation.approvals (run_id, plan_id, plan_hash, approver, decision, comment, accepted,
               refusal_reason, via, event_key) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)
           ON CONFLICT (event_key) DO NOTHING""",
        record.run_id,
        record.plan_id,
        record.plan_hash,
        record.approver,
        record.decision,
        record.comment,
        record.accepted,
        record.refusal_reason,
        record.via,
        record.event_key,
    )
    verdict = "accepted" if record.accepted else f"refused ({record.refusal_reason})"
    await insert_timeline(
        pool,
        run_id=record.run_id,
        phase="awaiting_approval",
        actor=record.approver,
        message=f"{record.decision} via {record.via}: {verdict}",
        event_key=f"{record.event_key}:timeline",
        detail={"comment": record.comment, "plan_hash": record.plan_hash},
    )
