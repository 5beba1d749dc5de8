"""How fast the CLI answers: `remediate --help` and `remediate status ID` run as processes, beside the floor
(the interpreter starting and exiting), the one import `status` cannot avoid (the Temporal client), and
every library `status` loads imported and nothing else (what is left above it is this project's code and
the round trips)."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

from benchmarks.report import emit
from benchmarks.workflows import Stack, stack_env
from contracts import names
from contracts.models import Phase, RemediationRequest, RemediationResult, Scope
from local_platform.seeder import SeedSpec, seed

RUNS = 9
# The libraries `remediate status` loads (its own modules aside): the CLI framework, settings, the Temporal
# client with its pydantic converter, the payload codec's cipher, and the driver of the reversal lookup.
STATUS_LIBRARIES = (
    "import typer, typer._adapters, pydantic_settings, temporalio.client, temporalio.contrib.pydantic,"
    " cryptography.hazmat.primitives.ciphers.aead, asyncpg"
)


async def _timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}: {err.decode()[-2000:]}{out.decode()[-500:]}"
        )
    return took


async def bench_cli(stack: Stack, runs: int = RUNS) -> None:
    """Median and max of ``runs`` process runs each, measured interleaved so load affects all alike."""
    async with stack.db.acquire() as conn:
        await seed(conn, SeedSpec(orgs=2, allocations=40, prefix="cli", seed=1))
    handle = await stack.client.start_workflow(
        names.WORKFLOW,
        RemediationRequest(
            correlation_id="bench-cli", requested_by="bench", dry_run=True, scope=Scope(org_id="cli-org-0000")
        ),
        id="remediation-bench-cli",
        task_queue=stack.settings.task_queue,
        result_type=RemediationResult,
    )
    result = await handle.result()
    assert result.outcome is Phase.DRY_RUN_COMPLETE, result
    remediate = str(Path(sys.executable).with_name("remediate"))
    commands = {
        "python_floor": [sys.executable, "-c", "pass"],
        "import_temporal_client": [sys.executable, "-c", "import temporalio.client"],
        "import_status_libraries": [sys.executable, "-c", STATUS_LIBRARIES],
        "help": [remediate, "--help"],
        "status": [remediate, "status", handle.id],
    }
    env = stack_env(stack.settings)
    for argv in commands.values():  # warm the page cache and .pyc files
        await _timed(argv, env)
    taken: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, argv in commands.items():
            taken[name].append(await _timed(argv, env))
    emit(
        "cli",
        runs=runs,
        **{f"{name}_median_s": round(statistics.median(v), 3) for name, v in taken.items()},
        **{f"{name}_max_s": round(max(v), 3) for name, v in taken.items()},
    )
