"""The remediation timeline's one INSERT (idempotent per event key), for activities and clients."""

from __future__ import annotations

import json
from typing import Any

import asyncpg


async def insert_timeline(
    conn: asyncpg.Pool | asyncpg.Connection,
    *,
    run_id: str,
    phase: str,
    actor: str,
    message: str,
    event_key: str,
    detail: dict[str, Any],
) -> None:
    """Append one event to a registered run's timeline; an event key already written, or a run not
    registered (yet), writes nothing."""
    await conn.execute(
        """INSERT INTO remediation.timeline (run_id, phase, actor, message, detail, event_key)
           SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM remediation.runs WHERE run_id = $1)
           ON CONFLICT (event_key) DO NOTHING""",
        run_id,
        phase,
        actor,
        message,
        json.dumps(detail, default=str),
        event_key,
    )
