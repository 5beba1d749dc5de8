"""Apply numbered `.sql` files once each, recorded in `public.schema_migrations`."""

from __future__ import annotations

from pathlib import Path

import asyncpg

# One advisory lock id for every migration run, so concurrent starters serialize.
_MIGRATION_LOCK = 7_302_114_001


def remediation_migrations_dir() -> Path:
    """Folder holding the remediation schema's migrations."""
    return Path(__file__).parent / "remediation"


async def apply_migrations(conn: asyncpg.Connection, directory: Path, *, component: str) -> list[str]:
    """Apply the not-yet-applied files of ``directory`` in name order; return their names."""
    applied: list[str] = []
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS public.schema_migrations (
               component text NOT NULL, name text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (component, name))"""
    )
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        done = {
            r["name"]
            for r in await conn.fetch(
                "SELECT name FROM public.schema_migrations WHERE component = $1", component
            )
        }
        for path in sorted(directory.glob("*.sql")):  # noqa: ASYNC240 - a handful of small local files
            if path.name in done:
                continue
            await conn.execute(path.read_text())
            await conn.execute(
                "INSERT INTO public.schema_migrations (component, name) VALUES ($1, $2)", component, path.name
            )
            applied.append(path.name)
    return applied
