"""What the approval page reads from Postgres: the customers a plan touches and its actions, by page."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from contracts.models import action_effect

PAGE_SIZE = 50


async def actions_page(
    pool: asyncpg.Pool, plan_id: str, after: int
) -> tuple[list[dict[str, Any]], int | None]:
    """PAGE_SIZE actions after sequence ``after`` (keyset: as fast on a 1,000,000-action plan as on 10),
    with the provider's evidence for payment rows and, once applied, each one's outcome and skip reason;
    and the sequence to continue from, or None."""
    rows = await pool.fetch(
        """SELECT pa.seq, pa.kind, pa.entity_type, pa.entity_id, pa.org_id, pa.user_id, pa.amount_minor, pa.params,
                  aa.outcome, aa.after->>'skipped' AS reason
           FROM remediation.plan_actions pa
           LEFT JOIN remediation.applied_actions aa ON aa.plan_id = pa.plan_id AND aa.seq = pa.seq
           WHERE pa.plan_id = $1 AND pa.seq > $2 ORDER BY pa.seq LIMIT $3""",
        plan_id,
        after,
        PAGE_SIZE + 1,
    )
    found = []
    for row in rows[:PAGE_SIZE]:
        action = dict(row)
        params = json.loads(action.pop("params") or "{}")
        action["provider"] = params.get("provider") if isinstance(params.get("provider"), dict) else None
        action["effect"] = action_effect(action["kind"], params)
        found.append(action)
    return found, (found[-1]["seq"] if len(rows) > PAGE_SIZE else None)
