"""Seeding ten million rows the way one builds any large database: load first, index after.

Maintaining some twenty secondary indexes row by row made a 10 M-row seed take about an hour here,
most of it random btree inserts once the indexes outgrew the cache; building them once from the
loaded tables takes minutes. Constraint indexes (primary keys, UNIQUE constraints) stay: the load
relies on them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

# Indexes of the platform's schema that no constraint owns: safe to drop and build again.
_SECONDARY = """SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS definition
                FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
                JOIN pg_namespace n ON n.oid = t.relnamespace
                WHERE n.nspname = $1
                  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)"""


@asynccontextmanager
async def indexes_built_after(conn: asyncpg.Connection, schema: str = "billing") -> AsyncIterator[None]:
    """Drop ``schema``'s secondary indexes for the block, then build them again (also on failure)."""
    indexes = await conn.fetch(_SECONDARY, schema)
    for index in indexes:
        await conn.execute(f"DROP INDEX {index['name']}")
    try:
        yield
    finally:
        await conn.execute("SET maintenance_work_mem = '1GB'")
        for index in indexes:
            await conn.execute(index["definition"])
        await conn.execute("RESET maintenance_work_mem")
