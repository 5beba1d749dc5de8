"""The data-consistency counts read the indexes the platform keeps for them (migrations 006 and 009).

For a user's dispute, the usage and ledger columns the two scanning counts read are all in their covering
indexes, so those counts need no table heap at 10 M rows: a column added to a check but not to its index,
or a predicate edited on one side only, fails here instead of slowing every dispute."""

from __future__ import annotations

import json
import re
from typing import Any

import asyncpg
import pytest

from activities.postgres.consistency_sql import consistency_counts
from contracts.models import Scope
from local_platform.seeder import SeedSpec, seed
from tests.conftest import World


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan."""
    return [plan, *(n for child in plan.get("Plans", []) for n in _nodes(child))]


async def _explain(conn: asyncpg.Connection, sql: str, params: list[str]) -> list[dict[str, Any]]:
    plan = json.loads(await conn.fetchval(f"EXPLAIN (VERBOSE, FORMAT JSON) {sql}", *params))
    return _nodes(plan[0]["Plan"])


async def _index_columns(conn: asyncpg.Connection, index: str) -> set[str]:
    """An index's key, INCLUDE and predicate columns."""
    row = await conn.fetchrow(
        """SELECT array_agg(a.attname::text) AS cols, pg_get_expr(i.indpred, i.indrelid) AS pred
           FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
           WHERE i.indexrelid = $1::regclass GROUP BY i.indpred, i.indrelid""",
        index,
    )
    return set(row["cols"]) | set(re.findall(r"[a-z_]+", row["pred"] or ""))


def _read_from(sql: str, alias: str) -> set[str]:
    """The columns a count's SQL reads from the table under ``alias``."""
    return set(re.findall(rf"\b{alias}\.([a-z_]+)", sql))


@pytest.mark.asyncio(loop_scope="session")
async def test_a_users_consistency_counts_read_only_indexed_columns(world: World) -> None:
    async with world.db.acquire() as conn:
        await seed(conn, SeedSpec(orgs=2, allocations=400, prefix="ci", seed=5))
        await conn.execute(
            "VACUUM (ANALYZE) billing.usage_records, billing.ledger_entries, billing.allocations"
        )
        user = await conn.fetchval("SELECT requested_by_user_id FROM billing.usage_records LIMIT 1")
        counts = {c.name: c for c in consistency_counts(Scope(user_id=user))}
        usage_user = await _index_columns(conn, "billing.usage_user")
        debit = await _index_columns(conn, "billing.ledger_one_debit_per_usage")
        for name in ("attribution_boundary", "ledger_projection_users"):
            read = _read_from(counts[name].sql, "u")
            assert read and read <= usage_user, (name, read - usage_user)
        read = _read_from(counts["ledger_projection_users"].sql, "l")
        assert read and read <= debit, read - debit
        async with conn.transaction():
            # The tables are tiny here: make the planner show which index it can use, as at 10 M rows.
            await conn.execute("SET LOCAL enable_seqscan = off")
            await conn.execute("SET LOCAL enable_bitmapscan = off")
            for name, index in (
                ("usage_lifecycle", "usage_lifecycle_violations"),
                ("allocation_boundary", "allocations_boundary_violations"),
            ):
                nodes = await _explain(conn, counts[name].sql, counts[name].params)
                # The invariant counts read their (normally empty) partial indexes of violating rows.
                assert any(n.get("Index Name") == index for n in nodes), (name, nodes)
