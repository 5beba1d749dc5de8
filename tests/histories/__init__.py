"""Recorded workflow histories replayed in CI (`tests/test_replay.py`).

Set ``RECORD_HISTORIES=1`` when running the end-to-end tests to refresh the JSON files here; commit
them with the workflow change they belong to, so older histories keep proving the new code replays.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from temporalio.client import WorkflowHandle, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows.launch_guard import LaunchGuardWorkflow
from workflows.remediation import BillingRemediationWorkflow
from workflows.sandbox import workflow_runner

HISTORY_DIR = Path(__file__).parent


async def keep_history(handle: WorkflowHandle[Any, Any], name: str) -> None:
    """Write the finished run's history to ``tests/histories/<name>.json`` when recording."""
    if os.environ.get("RECORD_HISTORIES") != "1":
        return
    history = await handle.fetch_history()
    # The workflow id is not in the events, but child workflow ids derive from it: keep it beside them.
    data = {"workflowId": handle.id, **json.loads(history.to_json())}
    (HISTORY_DIR / f"{name}.json").write_text(json.dumps(data))


def load(path: Path) -> WorkflowHistory:
    """A committed history with the workflow id it ran under."""
    data = json.loads(path.read_text())
    return WorkflowHistory.from_json(data.pop("workflowId", path.stem), data)


async def replay_failure(history: WorkflowHistory) -> Exception | None:
    """Replay ``history`` against today's workflow code, as a worker would; the failure, if any."""
    replayer = Replayer(
        workflows=[BillingRemediationWorkflow, LaunchGuardWorkflow],
        data_converter=pydantic_data_converter,
        workflow_runner=workflow_runner(),
    )
    return (await replayer.replay_workflow(history, raise_on_replay_failure=False)).replay_failure


def recorded() -> list[Path]:
    """The committed histories, sorted by name."""
    return sorted(HISTORY_DIR.glob("*.json"))
