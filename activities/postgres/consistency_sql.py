"""The runbook's data-consistency checks as counts per scope, and the platform-wide drift by org."""

from __future__ import annotations

import asyncio
from typing import NamedTuple

import asyncpg

from activities.postgres.drift_sql import checks
from activities.scope_sql import ALLOCATION_COLUMNS, USAGE_COLUMNS, scope_predicate
from contracts.models import DriftKind, Scope

# Counts that read partial indexes of violating rows (local_platform migration 006): cheap at any scope.
INDEXED = ("usage_lifecycle", "allocation_boundary")
# Counts that read every row of the scope: platform-wide they come from the periodic summary.
SCANNING = ("attribution_boundary", "ledger_projection_users")

# The org of each drifted key, per check (the key is what drift_sql's candidates select).
ORG_OF_KEY = {
    DriftKind.MISSING_OPEN_USAGE: "SELECT a.org_id FROM billing.allocations a WHERE a.id = cand.key",
    DriftKind.ORPHAN_OPEN_USAGE: """SELECT u.org_id FROM billing.usage_records u
                                    WHERE u.allocation_id = cand.key AND u.end_time IS NULL""",
    DriftKind.UNBILLED_CLOSED_USAGE: "SELECT u.org_id FROM billing.usage_records u WHERE u.id = cand.key",
    DriftKind.PAYMENT_DRIFT: "SELECT p.org_id FROM billing.payment_sessions p WHERE p.id = cand.key",
}


class Count(NamedTuple):
    """One consistency count: its name, a SELECT count(*), and its params."""

    name: str
    sql: str
    params: list[str]


def consistency_counts(scope: Scope, names: tuple[str, ...] = INDEXED + SCANNING) -> list[Count]:
    """The named consistency counts for ``scope`` (the predicates of the INDEXED ones match migration 006)."""
    usage_pred, params = scope_predicate(scope, USAGE_COLUMNS, 1)
    alloc_pred, alloc_params = scope_predicate(scope, ALLOCATION_COLUMNS, 1)
    sql = {
        "usage_lifecycle": (
            f"""SELECT count(*) FROM billing.usage_records u WHERE {usage_pred}
                AND (u.end_time < u.start_time OR u.last_billed_at > coalesce(u.end_time, 'infinity')
                     OR (u.end_time IS NULL AND u.accrued_cost_minor > 0))""",
            params,
        ),
        "allocation_boundary": (
            f"""SELECT count(*) FROM billing.allocations a WHERE {alloc_pred}
                AND ((a.status = 'released' AND a.released_at IS NULL)
                     OR (a.status IN ('releasing', 'release_failed') AND a.releasing_at IS NULL))""",
            alloc_params,
        ),
        "attribution_boundary": (
            f"""SELECT count(*) FROM billing.usage_records u JOIN billing.allocations a ON a.id = u.allocation_id
                WHERE {usage_pred} AND (u.app_instance_id IS DISTINCT FROM a.app_instance_id
                    OR u.usage_source <> a.usage_source OR u.control_plane_component <> a.control_plane_component
                    OR u.operating_mode <> a.operating_mode OR u.control_plane_scope <> a.control_plane_scope
                    OR u.runtime_backend <> a.runtime_backend)""",
            params,
        ),
        "ledger_projection_users": (
            f"""SELECT count(*) FROM (
                  SELECT u.requested_by_user_id FROM billing.usage_records u
                  LEFT JOIN billing.ledger_entries l ON l.usage_record_id = u.id AND l.kind = 'usage_debit' AND l.reversed_by_entry_id IS NULL
                  WHERE u.end_time IS NOT NULL AND {usage_pred}
                  GROUP BY 1 HAVING sum(u.accrued_cost_minor) <> -coalesce(sum(l.amount_minor), 0)) d""",
            params,
        ),
    }
    return [Count(name, *sql[name]) for name in names]


async def count_all(pool: asyncpg.Pool, counts: list[Count]) -> dict[str, int]:
    """Run the counts concurrently, one pooled connection each."""

    async def one(count: Count) -> int:
        return int(await pool.fetchval(count.sql, *count.params))

    values = await asyncio.gather(*(one(c) for c in counts))
    return {c.name: v for c, v in zip(counts, values, strict=True)}


async def drift_by_org(pool: asyncpg.Pool, scope: Scope) -> tuple[dict[str, int], set[str]]:
    """Drifted entities per runbook check in ``scope``, and the orgs they belong to (the checks run concurrently)."""

    async def one(kind: DriftKind) -> tuple[int, list[str]]:
        check = checks(scope, 1)[kind]
        row = await pool.fetchrow(
            f"""WITH cand(key) AS MATERIALIZED ({check.candidates})
                SELECT count(*) AS n, array_agg(DISTINCT o.org_id) FILTER (WHERE o.org_id IS NOT NULL) AS orgs
                FROM cand CROSS JOIN LATERAL ({ORG_OF_KEY[kind]} LIMIT 1 OFFSET 0) o""",
            *check.params,
        )
        return int(row["n"]), list(row["orgs"] or [])

    kinds = list(ORG_OF_KEY)
    results = await asyncio.gather(*(one(kind) for kind in kinds))
    orgs: set[str] = set()
    for _, found in results:
        orgs.update(found)
    return {kind.value: n for kind, (n, _) in zip(kinds, results, strict=True)}, orgs
