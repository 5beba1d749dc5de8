"""Recorded workflow histories replayed in CI (`tests/test_replay.py`).

Set ``RECORD_HISTORIES=1`` when running the end-to-end tests to refresh the JSON files here; commit
them with the workflow change they belong to, so older histories keep proving the new code replays.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from temporalio.client import WorkflowHandle

HISTORY_DIR = Path(__file__).parent


async def keep_history(handle: WorkflowHandle[Any, Any], name: str) -> None:
    """Write the finished run's history to ``tests/histories/<name>.json`` when recording."""
    if os.environ.get("RECORD_HISTORIES") != "1":
        return
    history = await handle.fetch_history()
    (HISTORY_DIR / f"{name}.json").write_text(history.to_json())


def recorded() -> list[Path]:
    """The committed histories, sorted by name."""
    return sorted(HISTORY_DIR.glob("*.json"))
