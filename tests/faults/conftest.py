"""Fixtures shared by the fault tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from config import Settings
from tests.conftest import World, make_world
from tests.faults.harness import FAST_FAILOVER


@pytest_asyncio.fixture(loop_scope="session")
async def process_world(
    pg_settings: Settings, template_db: str, state_root: Path, temporal_env: WorkflowEnvironment
) -> AsyncIterator[World]:
    """A world whose workers are separate processes (started by the test)."""
    async for w in make_world(
        pg_settings, template_db, state_root, temporal_env.client, in_process_worker=False, **FAST_FAILOVER
    ):
        yield w
