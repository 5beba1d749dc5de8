"""Real processes to kill: the remediation worker as a subprocess, configured like production."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
from temporalio.testing import WorkflowEnvironment

from config import Settings
from tests.conftest import World, signed_approvers

# Work held by a dead worker moves on within seconds (production defaults are a minute).
FAST_FAILOVER: dict[str, Any] = {
    "ACTIVITY_TIMEOUT_SECONDS": 5,
    "ACTIVITY_HEARTBEAT_SECONDS": 2,
    "ACTIVITY_RETRY_MAX_INTERVAL_SECONDS": 1,
    "APPLY_BATCH_SIZE": 20,
    "VERIFY_WINDOW_SECONDS": 1,
}


def temporal_address(env: WorkflowEnvironment) -> str:
    """host:port of the test's Temporal server, for worker processes."""
    return str(env.client.service_client.config.target_host)


def worker_env(settings: Settings, temporal_address: str) -> dict[str, str]:
    """The environment a worker process needs to serve ``settings``' world."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "NATS_", "TEMPORAL_"))}
    env.update(
        {
            "REMEDIATION_STATE_DIR": str(settings.state_dir),
            "DATABASE_URL": settings.resolved_database_url(),
            "NATS_URL": settings.resolved_nats_url(),
            "TEMPORAL_ADDRESS": temporal_address,
            "REMEDIATION_TASK_QUEUE": settings.task_queue,
            "PLATFORM_PORT": str(settings.platform_port),
            "APPROVERS": json.dumps(signed_approvers()),
            "PAYLOAD_ENCRYPTION": "off",
            "WORKER_METRICS_PORT": "0",
            "TEMPORAL_SDK_METRICS_PORT": "0",
            "WORKER_VERSIONING": settings.worker_versioning,
            "VERIFY_WINDOW_SECONDS": str(settings.verify_window_seconds),
            "APPLY_BATCH_SIZE": str(settings.apply_batch_size),
            "ACTIVITY_TIMEOUT_SECONDS": str(settings.activity_timeout_seconds),
            "ACTIVITY_HEARTBEAT_SECONDS": str(settings.heartbeat_seconds),
            "ACTIVITY_RETRY_MAX_INTERVAL_SECONDS": str(settings.retry_max_interval_seconds),
        }
    )
    return env


class WorkerProcess:
    """`remediate worker` in its own process group, killed for real."""

    def __init__(
        self,
        settings: Settings,
        temporal_address: str,
        log: Path,
        *,
        command: list[str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self._env = worker_env(settings, temporal_address)
        self._log = log
        # Default: this checkout's code; another install's `remediate worker` (run outside the checkout).
        self._command = command or [sys.executable, "-m", "starters.cli", "worker"]
        self._cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    @property
    def pid(self) -> int | None:
        """The running worker's pid (its Temporal identity is ``pid@host``)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        """Start a fresh worker process."""
        with self._log.open("ab") as out:
            self._proc = subprocess.Popen(
                self._command,
                env=self._env,
                cwd=self._cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill9(self) -> None:
        """SIGKILL the worker: no shutdown, no cleanup, in-flight transactions cut off."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
            self.kills += 1

    def stop(self) -> None:
        """Stop gracefully (test teardown)."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()


async def applied_count(world: World, plan_id: str) -> int:
    """Audited actions of ``plan_id`` so far (committed with their effects)."""
    return int(
        await world.db.fetchval(
            "SELECT count(*) FROM remediation.applied_actions WHERE plan_id = $1", plan_id
        )
    )


class Pin:
    """A table held locked so that a worker's statement on it waits: the worker is provably inside that step."""

    def __init__(self, watch: asyncpg.Connection, statement: str) -> None:
        # Its own connection outside the lock's transaction: pg_stat_activity is a per-transaction snapshot.
        self._watch = watch
        self._statement = statement
        self._done: set[int] = set()

    async def _waiters(self) -> set[int]:
        rows = await self._watch.fetch(
            """SELECT pid FROM pg_stat_activity WHERE datname = current_database()
               AND wait_event_type = 'Lock' AND strpos(query, $1) > 0""",
            self._statement,
        )
        return {r["pid"] for r in rows}

    async def next_waiter(self, timeout: float = 120) -> int:
        """The backend pid of a live session whose ``statement`` waits on the lock."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if fresh := await self._waiters() - self._done:
                # A killed worker's session lingers up to one client check (250 ms): live ones stay.
                await asyncio.sleep(0.4)
                if alive := fresh & await self._waiters():
                    return min(alive)
            await asyncio.sleep(0.02)
        raise AssertionError(f"no worker statement {self._statement!r} waited on the lock within {timeout}s")

    async def kill_inside(self, worker: WorkerProcess) -> None:
        """kill -9 ``worker`` while its statement waits here; its session must end with the process."""
        pid = await self.next_waiter()
        worker.kill9()
        self._done.add(pid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        # The server notices the dead client (client_connection_check_interval) and rolls back.
        while pid in await self._waiters():
            if loop.time() > deadline:
                raise AssertionError(f"backend {pid} of the killed worker still waits after 30s")
            await asyncio.sleep(0.05)
        worker.start()


async def notice_dead_clients(world: World) -> None:
    """New sessions of the world's database check for a vanished client every 250 ms (also in lock waits)."""
    async with world.db.acquire() as conn:
        db = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'ALTER DATABASE "{db}" SET client_connection_check_interval = 250')


@contextlib.asynccontextmanager
async def pinned(world: World, table: str, statement: str) -> AsyncIterator[Pin]:
    """Hold ``table`` in ACCESS EXCLUSIVE mode until the block ends (also when Postgres restarts inside it)."""
    dsn = world.settings.resolved_database_url()
    conn = await asyncpg.connect(dsn)
    watch = await asyncpg.connect(dsn)
    tx = conn.transaction()
    await tx.start()
    await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    try:
        yield Pin(watch, statement)
    finally:
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await tx.rollback()
        for c in (conn, watch):
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await c.close(timeout=5)
