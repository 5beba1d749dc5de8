"""`make ui-check`: look at a finished remediation in the real Temporal UI, as a person would.

Opens the workflow's page in headless Chromium (Debian's `chromium`) and saves a screenshot under
`docs/`, so a reviewer can see what an auditor sees without starting anything.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from temporalio.client import Client

from config import Settings

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


class UiCheckError(Exception):
    """Why the UI could not be checked (no browser, no finished remediation, empty screenshot)."""


async def latest_finished(client: Client) -> str:
    """The id of the most recently closed remediation."""
    async for execution in client.list_workflows(
        "WorkflowType = 'BillingRemediation' AND ExecutionStatus = 'Completed'", limit=1
    ):
        return execution.id
    raise UiCheckError("no finished remediation to look at: run `make demo` first")


def screenshot(url: str, out: Path, *, browser: str | None = None) -> Path:
    """Render ``url`` in headless Chromium (JS and API calls given time to settle) into ``out``."""
    binary = browser or shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise UiCheckError("chromium is not installed (Debian: apt-get install chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            binary,
            *CHROMIUM_FLAGS,
            "--window-size=1440,2200",
            "--virtual-time-budget=20000",
            f"--screenshot={out}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    if not out.exists() or out.stat().st_size < 10_000:
        raise UiCheckError(f"the screenshot {out} is missing or blank")
    return out


async def ui_check(client: Client, settings: Settings, out: Path) -> tuple[str, Path]:
    """Screenshot the newest finished remediation's page; returns its URL and the image path."""
    url = settings.workflow_ui_link(await latest_finished(client))
    return url, screenshot(url, out)
