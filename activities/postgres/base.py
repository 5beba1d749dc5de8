"""What every billing-database activity shares: the pool, one driver-error wrapper, diagnosis and timeline rows."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from activities.errors import dependency_down
from contracts.models import RunRef
from database.timeline import insert_timeline

# Driver errors that mean "the database is unreachable or restarting": retry them.
TRANSIENT = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InterfaceError,
    TimeoutError,
)

# asyncpg prepares every statement; after five runs Postgres may switch to a generic plan that ignores
# the actual scope or batch (measured: an apply batch went from 35 ms to over 300 ms on a 1 M-row plan).
CUSTOM_PLANS = "SET LOCAL plan_cache_mode = force_custom_plan"
RECONCILE_WORK_MEM = "256MB"


@contextlib.contextmanager
def driver_errors() -> Any:
    """Map "the database is unreachable or restarting" to the retryable DependencyDown, on every path."""
    try:
        yield
    except TRANSIENT as exc:
        raise dependency_down(f"Postgres unavailable: {type(exc).__name__}") from exc


class PostgresActivities:
    """Base of the billing-database activity groups: the pool and its guarded calls."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection inside a transaction; driver failures become DependencyDown."""
        with driver_errors():
            async with self._pool.acquire() as conn, conn.transaction():
                yield conn

    async def _execute(self, sql: str, *args: Any) -> str:
        with driver_errors():
            return str(await self._pool.execute(sql, *args))

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        with driver_errors():
            return list(await self._pool.fetch(sql, *args))

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record:
        with driver_errors():
            return await self._pool.fetchrow(sql, *args)

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        with driver_errors():
            return await self._pool.fetchval(sql, *args)

    async def _diagnosis(self, ref: RunRef, check: str, status: str, data: dict[str, Any]) -> None:
        await self._execute(
            """INSERT INTO remediation.diagnoses (run_id, check_name, status, data) VALUES ($1, $2, $3, $4)
               ON CONFLICT (run_id, check_name) DO UPDATE SET status = excluded.status, data = excluded.data,
               at = now()""",
            ref.run_id,
            check,
            status,
            json.dumps(data, default=str),
        )

    async def _timeline(
        self, run_id: str, key: str, phase: str, message: str, detail: dict[str, Any]
    ) -> None:
        with driver_errors():
            await insert_timeline(
                self._pool,
                run_id=run_id,
                phase=phase,
                actor="remediation-worker",
                message=message,
                event_key=f"{run_id}:{key}",
                detail=detail,
            )
