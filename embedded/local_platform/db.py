"""Connections and schema for the platform stand-in."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from migrations.runner import apply_migrations

MIGRATIONS = Path(__file__).parent / "migrations"
HOUR_SECONDS = 3600


def usage_cost_minor(duration_seconds: int, hourly_rate_minor: int) -> int:
    """The platform's pricing rule: whole seconds at the hourly rate, rounded up to a minor unit."""
    return (max(duration_seconds, 0) * hourly_rate_minor + HOUR_SECONDS - 1) // HOUR_SECONDS


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Create or upgrade the billing platform's schema."""
    return await apply_migrations(conn, MIGRATIONS, component="billing_platform")
