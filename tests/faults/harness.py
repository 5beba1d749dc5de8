"""Real processes to kill: the remediation worker as a subprocess, configured like production."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from temporalio.testing import WorkflowEnvironment

from config import Settings
from tests.conftest import World, signed_approvers
from tests.test_remediation_workflow import DRIFT_SQL, drift
from workflows.models import PlanSummary

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

    def __init__(self, settings: Settings, temporal_address: str, log: Path) -> None:
        self._env = worker_env(settings, temporal_address)
        self._log = log
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
                [sys.executable, "-m", "starters.cli", "worker"],
                env=self._env,
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


async def assert_ledger_is_the_plan(world: World, plan: PlanSummary) -> None:
    """The ledger ends exactly as approved: every action audited once, no key twice, no drift left."""
    rows = await world.db.fetch(
        "SELECT seq, outcome FROM remediation.applied_actions WHERE plan_id = $1", plan.plan_id
    )
    assert len(rows) == len({r["seq"] for r in rows})
    # API actions (restriction clear, worker restart) are audited in the same table.
    assert len(rows) == plan.action_count, (len(rows), plan)
    assert {r["outcome"] for r in rows} == {"applied"}, {r["outcome"] for r in rows}
    duplicates = await world.db.fetchval(
        "SELECT count(*) - count(DISTINCT idempotency_key) FROM billing.ledger_entries"
    )
    assert duplicates == 0
    posted = await world.db.fetchval(
        "SELECT coalesce(sum(amount_minor), 0) FROM billing.ledger_entries WHERE actor LIKE 'remediation:%'"
    )
    assert posted == plan.debit_total_minor + plan.credit_total_minor
    assert await drift(world) == {k: set() for k in DRIFT_SQL}


async def applied_count(world: World, plan_id: str) -> int:
    """Audited actions of ``plan_id`` so far (committed with their effects)."""
    return int(
        await world.db.fetchval(
            "SELECT count(*) FROM remediation.applied_actions WHERE plan_id = $1", plan_id
        )
    )
