"""Benchmarks on the embedded Postgres: one JSON line per measurement, ratios measured side by side.

    python -m benchmarks [--usage-rows 2000000] [--apply-actions 100000] [--scopes 200] [--naive-sample 500]

Activities run through Temporal's ActivityEnvironment (the same code a worker runs, without a server).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import signal
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from temporalio.testing import ActivityEnvironment

from activities.postgres import BillingDatabaseActivities
from benchmarks.bulk_load import indexes_built_after
from benchmarks.cli import bench_cli
from benchmarks.payments import bench_payments
from benchmarks.report import emit
from benchmarks.reversal import bench_reversal
from benchmarks.time_to_plan import bench_time_to_plan
from benchmarks.watch import bench_drift_to_approval, bench_watch_tick
from benchmarks.workflows import bench_memory, bench_workflows, full_stack, percentile
from config import Settings
from contracts.models import ApplyRequest, PlanRequest, ReconcileRequest, RunRef, Scope
from devstack.processes import free_port
from devstack.stack import Postgres
from local_platform.db import migrate
from local_platform.seeder import SeedSpec, seed
from migrations.runner import apply_migrations, remediation_migrations_dir

T = TypeVar("T")
FLOOR_TABLES = ("allocations", "usage_records", "ledger_entries", "payment_sessions")


async def timed(fn: Callable[[], Awaitable[T]]) -> tuple[float, T]:
    started = time.perf_counter()
    result = await fn()
    return time.perf_counter() - started, result


@asynccontextmanager
async def database(name: str, keep: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A fresh database with both schemas on the benchmark's Postgres."""
    admin = await asyncpg.connect(keep.resolved_database_url())
    await admin.execute(f"DROP DATABASE IF EXISTS {name}")
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    url = keep.resolved_database_url().rsplit("/", 1)[0] + f"/{name}"
    pool = await asyncpg.create_pool(url, min_size=2, max_size=8, command_timeout=3600)
    async with pool.acquire() as conn:
        await migrate(conn)
        await apply_migrations(conn, remediation_migrations_dir(), component="remediation")
    try:
        yield pool
    finally:
        await pool.close()


async def settle(conn: asyncpg.Connection) -> None:
    """Bring a freshly bulk-loaded database to steady state: statistics and the visibility map.

    A production database has both from autovacuum; without the visibility map every index-only scan
    of a just-loaded table fetches each heap row, which measures the bulk load, not the checks.
    """
    await conn.execute("VACUUM (ANALYZE)")


async def register(pool: asyncpg.Pool, run_id: str, scope: Scope) -> RunRef:
    await pool.execute(
        """INSERT INTO remediation.runs (run_id, workflow_id, correlation_id, trigger, scope, requested_by, dry_run)
           VALUES ($1, $1, 'bench', 'manual', $2, 'bench', false) ON CONFLICT DO NOTHING""",
        run_id,
        scope.model_dump_json(),
    )
    return RunRef(run_id=run_id, workflow_id=run_id, correlation_id="bench", scope=scope)


async def count_all(pool: asyncpg.Pool) -> list[int]:
    """The floor: a bare sequential scan of every table the checks read, one after the other.

    Index and bitmap scans are turned off so count(*) really reads each table (left alone, Postgres
    answers it from the smallest index, which is not the floor the issue defines).
    """
    async with pool.acquire() as conn, conn.transaction():
        for setting in ("enable_indexscan", "enable_indexonlyscan", "enable_bitmapscan"):
            await conn.execute(f"SET LOCAL {setting} = off")
        return [int(await conn.fetchval(f"SELECT count(*) FROM billing.{t}")) for t in FLOOR_TABLES]


async def reconcile(
    env: ActivityEnvironment, acts: BillingDatabaseActivities, ref: RunRef, pass_no: int
) -> Any:
    """One reconciliation pass through the activity, as a worker runs it."""
    return await env.run(acts.reconcile, ReconcileRequest(ref=ref, pass_no=pass_no))


def drift_spec(rows: int, prefix: str, fraction: float) -> SeedSpec:
    """``rows`` usage records with ``fraction`` of them drifted, spread over the four kinds."""
    n = max(4, int(rows * fraction))
    inject = {
        "unbilled_closed": n // 2,
        "orphan_open": n // 4,
        "missing_open": n // 8,
        "payment_drift": n // 8,
    }
    return SeedSpec(
        orgs=max(5, rows // 20_000),
        allocations=rows,
        prefix=prefix,
        seed=1,
        inject=inject,
        publish_events_limit=0,
    )


async def bench_reconcile(
    pool: asyncpg.Pool, acts: BillingDatabaseActivities, env: ActivityEnvironment
) -> float:
    """All four checks over the whole database vs a bare count(*) over the tables they read."""
    ref = await register(pool, "bench-global", Scope())
    floors, runs = [], []
    total = 0
    for attempt in range(3):  # interleaved, so caches favour neither side
        floor, _ = await timed(partial(count_all, pool))
        floors.append(floor)
        took, summary = await timed(partial(reconcile, env, acts, ref, attempt))
        runs.append(took)
        total = summary.total
    floor_s, reconcile_s = min(floors), min(runs)
    emit(
        "reconcile",
        findings=total,
        reconcile_s=round(reconcile_s, 3),
        floor_s=round(floor_s, 3),
        ratio_to_floor=round(reconcile_s / floor_s, 2),
        note="floor = sequential count(*) over " + ", ".join(FLOOR_TABLES),
    )
    return reconcile_s


async def bench_naive(pool: asyncpg.Pool, sample: int, reconcile_s: float) -> None:
    """The runbook by hand: four lookups per allocation, timed on a sample and extrapolated."""
    ids = [r[0] for r in await pool.fetch("SELECT id FROM billing.allocations")]
    chosen = random.Random(3).sample(ids, min(sample, len(ids)))
    async with pool.acquire() as conn:

        async def by_hand() -> None:
            for alloc in chosen:
                status = await conn.fetchval("SELECT status FROM billing.allocations WHERE id = $1", alloc)
                await conn.fetch(
                    "SELECT id, end_time, accrued_cost_minor FROM billing.usage_records WHERE allocation_id = $1",
                    alloc,
                )
                await conn.fetch(
                    """SELECT l.id FROM billing.ledger_entries l JOIN billing.usage_records u
                       ON u.id = l.usage_record_id AND l.kind = 'usage_debit' WHERE u.allocation_id = $1""",
                    alloc,
                )
                await conn.fetch(
                    """SELECT p.id FROM billing.payment_sessions p
                       WHERE p.org_id = (SELECT org_id FROM billing.allocations WHERE id = $1)
                         AND (p.status = 'failed_reconcile' OR p.ledger_entry_id IS NULL)""",
                    alloc,
                )
                del status

        took, _ = await timed(by_hand)
    estimate = took / len(chosen) * len(ids)
    emit(
        "naive",
        sampled_allocations=len(chosen),
        sample_s=round(took, 3),
        extrapolated_s=round(estimate, 1),
        speedup_of_set_based=round(estimate / reconcile_s, 1),
    )


async def bench_scoped(
    pool: asyncpg.Pool, acts: BillingDatabaseActivities, env: ActivityEnvironment, count: int
) -> None:
    """Latency of scoped reconciliations (an org, a project, a user or an allocation) on the same data,
    overall and by scope kind (an org's cost follows its rows: its share of the usage is printed)."""
    rng = random.Random(9)
    orgs = [r[0] for r in await pool.fetch("SELECT id FROM billing.orgs")]
    projects = [r[0] for r in await pool.fetch("SELECT id FROM billing.projects LIMIT 5000")]
    users = [r[0] for r in await pool.fetch("SELECT id FROM billing.users LIMIT 5000")]
    allocs = [r[0] for r in await pool.fetch("SELECT id FROM billing.allocations LIMIT 20000")]
    make = {
        "org": lambda: Scope(org_id=rng.choice(orgs)),
        "project": lambda: Scope(project_id=rng.choice(projects)),
        "user": lambda: Scope(user_id=rng.choice(users)),
        "allocation": lambda: Scope(allocation_id=rng.choice(allocs)),
    }
    latencies: list[float] = []
    by_kind: dict[str, list[float]] = {kind: [] for kind in make}
    for i in range(count):
        kind = list(make)[i % len(make)]
        ref = await register(pool, f"bench-scoped-{i}", make[kind]())
        took, _ = await timed(partial(reconcile, env, acts, ref, 0))
        latencies.append(took * 1000)
        by_kind[kind].append(took * 1000)
    latencies.sort()
    usage = await pool.fetchval("SELECT count(*) FROM billing.usage_records")
    emit(
        "scoped",
        scopes=count,
        p50_ms=round(statistics.median(latencies), 1),
        p99_ms=round(percentile(latencies, 0.99), 1),
        max_ms=round(latencies[-1], 1),
        by_kind={
            kind: {
                "n": len(values),
                "p50_ms": round(statistics.median(values), 1),
                "p99_ms": round(percentile(sorted(values), 0.99), 1),
            }
            for kind, values in by_kind.items()
            if values
        },
        goal_p99_ms={"project": 50, "user": 50, "allocation": 50},
        org_share_of_usage=round(1 / max(1, len(orgs)), 4),
        usage_rows=int(usage),
    )


async def apply_floor(pool: asyncpg.Pool, plan_id: str) -> float:
    """The floor for applying ``plan_id``'s usage debits: the same ledger rows and audit rows written by one bare
    ``INSERT ... SELECT`` each (no re-check, no batches), in a transaction rolled back; seconds."""
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            started = time.perf_counter()
            await conn.execute(
                """INSERT INTO billing.ledger_entries (org_id, requested_by_user_id, kind, amount_minor,
                       usage_record_id, idempotency_key, actor, correlation_id)
                   SELECT u.org_id, u.requested_by_user_id, 'usage_debit', pa.amount_minor, u.id, pa.idempotency_key,
                          'remediation:floor', 'floor'
                   FROM remediation.plan_actions pa JOIN billing.usage_records u ON u.id = pa.entity_id::bigint
                   WHERE pa.plan_id = $1""",
                plan_id,
            )
            await conn.execute(
                """INSERT INTO remediation.applied_actions (plan_id, seq, idempotency_key, kind, outcome, actor,
                       approvers, workflow_id, correlation_id, before, after)
                   SELECT pa.plan_id, pa.seq, pa.idempotency_key, pa.kind, 'applied', 'floor', '{a}', 'floor', 'floor',
                          to_jsonb(u), to_jsonb(l)
                   FROM remediation.plan_actions pa JOIN billing.usage_records u ON u.id = pa.entity_id::bigint
                   JOIN billing.ledger_entries l ON l.idempotency_key = pa.idempotency_key
                   WHERE pa.plan_id = $1""",
                plan_id,
            )
            return time.perf_counter() - started
        finally:
            await tx.rollback()


async def bench_apply(keep: Settings, actions: int, batch: int = 500) -> None:
    """Approved actions applied per second, then the same fixes planned and applied again (0 changes)."""
    async with database("bench_apply", keep) as pool:
        async with pool.acquire() as conn:
            spec = SeedSpec(
                orgs=10,
                allocations=int(actions * 1.7),  # about 2/3 of allocations are released with cost
                prefix="ap",
                seed=2,
                inject={"unbilled_closed": actions},
                publish_events_limit=0,
            )
            await seed(conn, spec)
        acts = BillingDatabaseActivities(pool)
        env = ActivityEnvironment()
        ref = await register(pool, "bench-apply", Scope())
        # Two passes over the same drift: the second plan repeats the first's fixes.
        await reconcile(env, acts, ref, 0)
        await reconcile(env, acts, ref, 1)
        tracemalloc.start()
        plan = await env.run(
            acts.build_plan, PlanRequest(ref=ref, pass_no=0, plan_id="ap-p0", restart_worker=False)
        )
        request = ApplyRequest(
            ref=ref,
            plan_id=plan.plan_id,
            plan_hash=plan.plan_hash,
            actor="bench",
            approvers=["a"],
            batch_size=batch,
        )
        floor = await apply_floor(pool, plan.plan_id)
        took, summary = await timed(lambda: env.run(acts.apply_plan, request))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        ledger = await pool.fetchval("SELECT count(*) FROM billing.ledger_entries")
        # Same fixes again, as a new plan from the same findings: every action re-checks and is audited
        # as already done (by the first plan's debit).
        again = await env.run(
            acts.build_plan, PlanRequest(ref=ref, pass_no=1, plan_id="ap-p1", restart_worker=False)
        )
        second = await env.run(
            acts.apply_plan,
            request.model_copy(update={"plan_id": again.plan_id, "plan_hash": again.plan_hash}),
        )
        changed = await pool.fetchval("SELECT count(*) FROM billing.ledger_entries") - ledger
        emit(
            "apply",
            actions=plan.action_count,
            applied=summary.applied,
            seconds=round(took, 2),
            actions_per_s=round(summary.applied / took),
            floor_actions_per_s=round(plan.action_count / floor),
            apply_vs_floor=round(took / floor, 2),
            second_apply_changed_rows=changed,
            second_apply_already_applied=second.already_applied,
            second_apply_stale=second.skipped_stale,
            python_heap_peak_mb=round(peak / 2**20, 1),
            plan_summary_bytes=len(plan.model_dump_json()),
            apply_result_bytes=len(summary.model_dump_json()),
        )
        await bench_reversal(pool, env, acts, ref, summary.applied / took)


async def bench_database(keep: Settings, args: argparse.Namespace, root: Path) -> None:
    """seed, reconcile, naive and scoped on one database of ``--usage-rows`` usage records."""
    async with database("bench_main", keep) as pool:
        async with pool.acquire() as conn:
            started = time.perf_counter()
            async with indexes_built_after(conn):
                took, report = await timed(lambda: seed(conn, drift_spec(args.usage_rows, "bm", 0.001)))
            indexes_s = time.perf_counter() - started - took
            vacuum_s, _ = await timed(lambda: settle(conn))
        emit(
            "seed",
            usage_rows=report.usage_records,
            seconds=round(took, 1),
            indexes_built_after_s=round(indexes_s, 1),
            vacuum_analyze_s=round(vacuum_s, 1),
            injected={k: len(v) for k, v in report.injected.items()},
        )
        acts = BillingDatabaseActivities(pool)
        env = ActivityEnvironment()
        reconcile_s = await bench_reconcile(pool, acts, env)
        await bench_naive(pool, args.naive_sample, reconcile_s)
        await bench_scoped(pool, acts, env, args.scopes)
        if args.watch_changed:
            await bench_watch_tick(pool, root, args.watch_changed, reconcile_s)


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-"))
    if os.environ.get("DATABASE_URL"):
        keep = Settings()
        server = None
    else:
        os.environ.setdefault("REMEDIATION_PG_FAST", "1")
        keep = Settings(REMEDIATION_STATE_DIR=root, POSTGRES_PORT=free_port())
        server = Postgres(keep)
        server.start()
    emit(
        "machine",
        cpus=os.cpu_count(),
        python=platform.python_version(),
        system=platform.platform(),
        usage_rows=args.usage_rows,
    )
    try:
        if args.usage_rows:
            await bench_database(keep, args, root)
        if args.apply_actions:
            await bench_apply(keep, args.apply_actions, args.apply_batch)
        if args.payment_findings:
            async with database("bench_payments", keep) as pool:
                await bench_payments(pool, root, args.payment_findings, register)
    finally:
        if server is not None:
            server.stop()
            server.purge()  # as root its cluster lives outside the temporary directory
    if args.time_to_plan_sizes:
        async with full_stack(root / "ttp", provider=True) as stack:
            await bench_time_to_plan(stack, args.time_to_plan_sizes)
    if args.incidents or args.memory_sizes or args.watch_interval or args.cli_runs:
        async with full_stack(root / "stack") as stack:
            if args.cli_runs:
                await bench_cli(stack, args.cli_runs)
            if args.incidents:
                await bench_workflows(stack, args.incidents)
            if args.memory_sizes:
                await bench_memory(stack, args.memory_sizes)
            if args.watch_interval:
                await bench_drift_to_approval(stack, args.watch_interval)


def sizes(text: str) -> list[int]:
    """``1000,100000`` → [1000, 100000]; a clear argparse error for anything else."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        ) from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return values


def cli() -> None:
    """Parse flags and run every benchmark."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--usage-rows", type=int, default=2_000_000, help="0 skips seed/reconcile/naive/scoped"
    )
    parser.add_argument("--apply-actions", type=int, default=100_000, help="0 skips the apply benchmark")
    parser.add_argument(
        "--apply-batch",
        type=lambda text: sizes(text)[0],
        default=500,
        help="actions per apply batch (APPLY_BATCH_SIZE, 1-10000)",
    )
    parser.add_argument(
        "--cli-runs", type=int, default=9, help="`remediate --help` and `status` run as processes; 0 skips"
    )
    parser.add_argument(
        "--payment-findings", type=int, default=1000, help="checked against the provider; 0 skips"
    )
    parser.add_argument("--scopes", type=int, default=200)
    parser.add_argument(
        "--watch-changed",
        type=int,
        default=10_000,
        help="allocations changed before one drift watch tick; 0 skips",
    )
    parser.add_argument(
        "--watch-interval",
        type=int,
        default=60,
        help="the drift watch's schedule for drift → approval; 0 skips",
    )
    parser.add_argument("--naive-sample", type=int, default=500)
    parser.add_argument("--incidents", type=int, default=200, help="0 skips the workflow benchmark")
    parser.add_argument(
        "--time-to-plan-sizes",
        type=sizes,
        default=[1_000_000, 10_000_000],
        help="usage rows for start → plan waiting for approval, e.g. 1000000,10000000; empty skips",
    )
    parser.add_argument(
        "--memory-sizes", type=sizes, default=[1000, 100000], help="plan sizes, e.g. 1000,100000; empty skips"
    )
    try:
        asyncio.run(_until_terminated(main(parser.parse_args())))
    except asyncio.CancelledError:
        raise SystemExit(143) from None  # SIGTERM's exit status, after every server was stopped


async def _until_terminated(run: Awaitable[None]) -> None:
    """``run``, cancelled by SIGTERM as Ctrl-C cancels it: its servers are stopped on the way out (a plain
    SIGTERM ended the process and left Postgres, NATS, Temporal and the stand-ins running)."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    await run
