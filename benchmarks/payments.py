"""Payment findings checked against the real provider server (localstripe) through Stripe's SDK.

Side by side in one run: the same findings judged one lookup at a time and with the configured
concurrency. Loki is not running here, so every webhook status reads "unknown" (one failed query).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import httpx
from temporalio.testing import ActivityEnvironment

from activities.loki import LokiActivities
from activities.payment_checks import PaymentCheckActivities
from activities.payment_provider import StripePaymentProvider
from activities.postgres import BillingDatabaseActivities
from benchmarks.report import emit
from config import Settings
from contracts.models import ReconcileRequest, RunRef, Scope
from devstack.processes import free_port
from devstack.stack import PaymentProvider
from local_platform.provider_payments import seeder_for
from local_platform.seeder import SeedSpec, seed


async def bench_payments(
    pool: asyncpg.Pool,
    root: Path,
    findings: int,
    register: Callable[[asyncpg.Pool, str, Scope], Awaitable[RunRef]],
    concurrency: int = 8,
) -> None:
    """Seed ``findings`` payment findings with real provider payments, then time judging them."""
    settings = Settings(
        REMEDIATION_STATE_DIR=root / "provider", PAYMENT_PROVIDER_PORT=free_port(), PAYMENT_PROVIDER_URL=""
    )
    server = PaymentProvider(settings)
    server.start()
    provider = StripePaymentProvider(
        settings.resolved_payment_provider_url(), settings.payment_provider_api_key.get_secret_value()
    )
    loki_http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{free_port()}", timeout=2)
    try:
        mix = {
            "payment_drift": findings * 6 // 10,
            "payment_unpaid": findings * 2 // 10,
            "payment_refunded": findings // 10,
        }
        mix["payment_amount_mismatch"] = findings - sum(mix.values())
        spec = SeedSpec(
            orgs=10, allocations=findings * 12, prefix="pay", seed=4, inject=mix, publish_events_limit=0
        )
        started = time.perf_counter()
        async with pool.acquire() as conn, seeder_for(settings) as seeder:
            await seed(conn, spec, provider=seeder)
        seed_s = time.perf_counter() - started
        env = ActivityEnvironment()
        ref = await register(pool, "bench-payments", Scope())
        await env.run(BillingDatabaseActivities(pool).reconcile, ReconcileRequest(ref=ref, pass_no=0))
        loki = LokiActivities(loki_http, None)
        timings: dict[int, float] = {}
        for gate in (1, concurrency):
            await pool.execute(
                "UPDATE remediation.findings SET detail = detail - 'provider' WHERE run_id = $1", ref.run_id
            )
            acts = PaymentCheckActivities(pool, provider, loki, gate)
            started = time.perf_counter()
            summary = await env.run(acts.check_payment_findings, ReconcileRequest(ref=ref, pass_no=0))
            timings[gate] = time.perf_counter() - started
        emit(
            "payment_checks",
            findings=summary.checked,
            verdicts=summary.verdicts,
            seed_provider_payments_s=round(seed_s, 1),
            sequential_s=round(timings[1], 2),
            concurrent_s=round(timings[concurrency], 2),
            concurrency=concurrency,
            findings_per_s=round(summary.checked / timings[concurrency]),
            speedup=round(timings[1] / timings[concurrency], 2),
        )
    finally:
        await loki_http.aclose()
        await provider.aclose()
        server.stop()
