"""The CLI's exit code is the command's (issue 13): hundreds of read and write commands, three at a time
(load is what exposes it), with span export on, all exit 0; before the fix a few in a hundred died with
exit 134 in interpreter finalization (temporalio/sdk-python#300)."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from contracts.models import Phase
from local_platform.incidents import IncidentReport
from tests.faults.harness import temporal_address, worker_env
from tests.helpers import start_dispute, wait_phase

from .conftest import World

pytestmark = pytest.mark.asyncio(loop_scope="session")

REMEDIATE = str(Path(sys.executable).parent / "remediate")
ROUNDS = 45  # x 4 commands = 180 invocations (about 100 s here)


async def test_hundreds_of_cli_commands_all_exit_zero(
    world: World, temporal_env: WorkflowEnvironment
) -> None:
    incident, handle = await start_dispute(world, "cx")
    await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    env = worker_env(world.settings, temporal_address(temporal_env))
    # The stand-in receives OTLP: the span exporter's thread is running in every command.
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = world.settings.resolved_billing_api_url()
    commands = [
        ["list"],
        ["status", handle.id],
        ["plan", handle.id, "--limit", "5"],
        # A write: the same scope attaches to the running remediation (StartWorkflow, USE_EXISTING).
        start_args(incident),
    ]
    codes: Counter[int] = Counter()
    failures: list[str] = []
    slots = asyncio.Semaphore(3)

    async def run(args: list[str]) -> None:
        async with slots:
            proc = await asyncio.create_subprocess_exec(
                REMEDIATE, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            out, err = await proc.communicate()
        code = proc.returncode if proc.returncode is not None else -1
        codes[code] += 1
        if code != 0 and len(failures) < 3:
            failures.append(f"{args[0]} -> {code}: {err.decode()[-400:]}")
        if args[0] == "start" and code == 0:
            assert b"attached to the running remediation" in out

    await asyncio.gather(*(run(cmd) for _ in range(ROUNDS) for cmd in commands))
    assert codes == Counter({0: ROUNDS * len(commands)}), failures


def start_args(incident: IncidentReport) -> list[str]:
    """`remediate start` for the incident's (org, user) scope: attaches to its running remediation."""
    org, user = incident.scope["org_id"], incident.scope["user_id"]
    return [
        "start",
        "--correlation-id",
        incident.correlation_id,
        "--org",
        org,
        "--user",
        user,
        "--as",
        "ic-dana",
    ]


def _run_in_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``args`` with stdout and stderr on a pseudo-terminal, as a commander's shell would."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    code = proc.wait(timeout=60)
    os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


async def test_a_terminal_shows_only_human_lines_and_the_json_goes_to_the_log(
    world: World, temporal_env: WorkflowEnvironment
) -> None:
    incident, handle = await start_dispute(world, "tt")
    env = worker_env(world.settings, temporal_address(temporal_env))
    log = Path(env["REMEDIATION_STATE_DIR"]) / "logs" / "cli.log"
    args = [REMEDIATE, *start_args(incident)]
    code, screen = await asyncio.to_thread(_run_in_terminal, args, env)
    assert code == 0, screen
    assert "attached to the running remediation" in screen
    assert not [line for line in screen.splitlines() if line.lstrip().startswith("{")], screen
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(entry.get("workflow_id") == handle.id for entry in logged), logged
    # Not a terminal (a script, Alertmanager automation): the JSON lines stay on stderr as well.
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0
    assert not out.lstrip().startswith(b"{")
    assert [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    # Asked to keep stderr clean: none there, still in the file.
    before = len(log.read_text().splitlines())
    proc = await asyncio.create_subprocess_exec(
        *args, env=env | {"CLI_LOG": "file"}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0 and b"{" not in err
    assert len(log.read_text().splitlines()) > before
