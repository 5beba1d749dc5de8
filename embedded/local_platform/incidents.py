"""Reproduce each runbook trigger on the stand-in: worker crash, payment reconcile failures,
a single user's dispute, a prepaid org with a depleted balance."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg
from nats.aio.client import Client as NATS

from local_platform import telemetry
from local_platform.events import publish
from local_platform.provider_payments import ProviderOutcome, ProviderSeeder
from local_platform.seeder import SeedSpec, seed


@dataclass
class IncidentReport:
    """What an incident set up: where to start the remediation and the drift it contains."""

    name: str
    trigger: str
    correlation_id: str
    trace_id: str
    scope: dict[str, str]
    injected: dict[str, list[str]]
    seed: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


INCIDENTS = ("worker-crash", "worker-regression", "payments-reconcile", "user-dispute", "prepaid-depleted")
BAD_VERSION = "v1.43.0"
SERVICE_WORKER = "gpuaas-billing-worker"


async def _trace(
    conn: asyncpg.Connection, correlation_id: str, trace_id: str, failing: str, error: str, **fields: str
) -> None:
    """A small incident trace: api -> billing worker -> postgres, one error span, plus log lines."""
    now = time.time_ns() - 60_000_000_000
    root = telemetry.Span(
        trace_id,
        "gpuaas-api",
        "POST /api/v1/allocations/release",
        now,
        now + 900_000_000,
        kind="SPAN_KIND_SERVER",
        attributes={"correlation_id": correlation_id},
    )
    worker = telemetry.Span(
        trace_id,
        "gpuaas-billing-worker",
        "billing.process provisioning event",
        now + 100_000_000,
        now + 800_000_000,
        parent_span_id=root.span_id,
        kind="SPAN_KIND_CONSUMER",
    )
    failing_span = telemetry.Span(
        trace_id,
        failing,
        "billing.post_ledger_entry",
        now + 200_000_000,
        now + 700_000_000,
        parent_span_id=worker.span_id,
        error=error,
    )
    await telemetry.record_spans(conn, [root, worker, failing_span])
    await telemetry.log(
        conn,
        "gpuaas-api",
        "info",
        "request accepted",
        correlation_id=correlation_id,
        trace_id=trace_id,
        ts_ns=now,
    )
    await telemetry.log(
        conn,
        failing,
        "error",
        error,
        correlation_id=correlation_id,
        trace_id=trace_id,
        ts_ns=now + 700_000_000,
        # The failing service ships its trace id as structured metadata, not inside the line.
        trace_in_line=False,
        **fields,
    )


async def run_incident(
    name: str,
    conn: asyncpg.Connection,
    nc: NATS | None,
    *,
    prefix: str = "inc",
    provider: ProviderSeeder | None = None,
) -> IncidentReport:
    """Set up incident ``name`` and return where to point the remediation.

    With ``provider`` the payment sessions are real payments at the provider, and the worker-crash and
    payments-reconcile incidents also include payments the provider refunded or never captured.
    """
    at_provider = provider is not None
    trace_id = telemetry.new_trace_id()
    if name == "worker-crash":
        spec = SeedSpec(
            orgs=6,
            allocations=120,
            prefix=prefix,
            seed=11,
            inject={"missing_open": 3, "orphan_open": 2, "unbilled_closed": 4, "payment_drift": 2}
            | ({"payment_refunded": 1} if at_provider else {}),
        )
        report = await seed(conn, spec, nc, provider)
        corr = f"{prefix}-worker-crash"
        await conn.execute("UPDATE billing.worker_control SET mode = 'crashed', updated_at = now()")
        drifted = {a for ids in report.injected.values() for a in ids}
        replay = [
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM billing.allocations WHERE id LIKE $1 ORDER BY id", f"{prefix}-alloc-%"
            )
        ]
        if nc is not None:
            # The queue backs up: re-deliveries nobody consumes while the worker is down.
            backlog = [a for a in replay if a not in drifted][:150]
            for alloc in backlog:
                await publish(nc, "provisioning.active", corr, trace_id, allocation_id=alloc)
            await nc.flush()
        await conn.execute(
            """INSERT INTO billing.outbox (subject, payload, created_at)
               SELECT 'billing.usage_debited', jsonb_build_object('n', g), now() - interval '10 minutes'
               FROM generate_series(1, 120) g"""
        )
        await _trace(
            conn,
            corr,
            trace_id,
            "gpuaas-billing-worker",
            "billing worker crashed: panic in ledger projection (connection reset)",
        )
        return IncidentReport(name, "worker_failure", corr, trace_id, {}, report.injected, report.as_dict())
    if name == "payments-reconcile":
        mix = (
            {"payment_unpaid": 1, "payment_refunded": 1, "payment_amount_mismatch": 1} if at_provider else {}
        )
        spec = SeedSpec(orgs=3, allocations=100, prefix=prefix, seed=12, inject={"payment_drift": 4} | mix)
        report = await seed(conn, spec, nc, provider)
        corr = f"{prefix}-payments-reconcile"
        failed = [pay for kind in ("payment_drift", *mix) for pay in report.injected[kind]]
        if nc is not None:
            rows = await conn.fetch(
                "SELECT id, org_id FROM billing.payment_sessions WHERE id = ANY($1::text[])", failed
            )
            orgs = {row["id"]: row["org_id"] for row in rows}
            for pay in failed:
                await publish(
                    nc, "payments.reconcile_failed", corr, trace_id, payment_session_id=pay, org_id=orgs[pay]
                )
            await nc.flush()
        await _trace(
            conn,
            corr,
            trace_id,
            "gpuaas-webhook-worker",
            "payments.reconcile_failed: provider checkout completed but ledger link missing",
        )
        return IncidentReport(name, "reconcile_failed", corr, trace_id, {}, report.injected, report.as_dict())
    if name == "user-dispute":
        spec = SeedSpec(orgs=3, allocations=60, prefix=prefix, seed=13, inject={"orphan_open": 1})
        report = await seed(conn, spec, nc)
        alloc = report.injected["orphan_open"][0]
        row = await conn.fetchrow(
            "SELECT org_id, project_id, requested_by_user_id FROM billing.allocations WHERE id = $1", alloc
        )
        corr = f"{prefix}-user-dispute"
        await _trace(
            conn,
            corr,
            trace_id,
            "gpuaas-api",
            f"customer dispute: allocation {alloc} still accruing after release",
        )
        scope = {"org_id": row["org_id"], "user_id": row["requested_by_user_id"]}
        return IncidentReport(
            name, "customer_dispute", corr, trace_id, scope, report.injected, report.as_dict()
        )
    if name == "prepaid-depleted":
        spec = SeedSpec(
            orgs=1, allocations=12, prefix=prefix, seed=14, prepaid_every=1, inject={"payment_drift": 1}
        )
        report = await seed(conn, spec, nc)
        org = f"{prefix}-org-0000"
        pay = report.injected["payment_drift"][0]
        debits = -int(
            await conn.fetchval(
                "SELECT coalesce(sum(amount_minor), 0) FROM billing.ledger_entries WHERE org_id = $1", org
            )
        )
        if debits <= 0:
            raise ValueError("prepaid-depleted: the seed produced no usage debits; choose another seed")
        # The lost top-up would have covered the usage: crediting it must restore a positive balance.
        await conn.execute(
            "UPDATE billing.payment_sessions SET amount_minor = $2 WHERE id = $1", pay, debits + 25_000
        )
        if provider is not None:  # the customer paid that amount at the provider
            ref = await provider.create(ProviderOutcome.CAPTURED, pay, debits + 25_000, "usd")
            await conn.execute(
                "UPDATE billing.payment_sessions SET provider_ref = $2 WHERE id = $1", pay, ref
            )
        corr = f"{prefix}-prepaid-depleted"
        await conn.execute(
            """INSERT INTO billing.financial_restrictions (org_id, state, reason, block_new_launches, updated_by,
                   correlation_id) VALUES ($1, 'restricted', 'prepaid_balance_depleted', true, 'gpuaas-billing-worker', $2)
               ON CONFLICT (org_id) DO UPDATE SET state = 'restricted', reason = 'prepaid_balance_depleted',
                   block_new_launches = true""",
            org,
            corr,
        )
        await _trace(
            conn,
            corr,
            trace_id,
            "gpuaas-webhook-worker",
            f"payments.reconcile_failed for {pay}: top-up not credited, org restricted",
        )
        return IncidentReport(
            name, "prepaid_depleted", corr, trace_id, {"org_id": org}, report.injected, report.as_dict()
        )
    if name == "worker-regression":
        return await _worker_regression(conn, nc, prefix, trace_id, provider)
    raise ValueError(f"unknown incident {name!r}; expected one of {', '.join(INCIDENTS)}")


async def _worker_regression(
    conn: asyncpg.Connection, nc: NATS | None, prefix: str, trace_id: str, provider: ProviderSeeder | None
) -> IncidentReport:
    """A new billing-worker revision fails every event since its rollout; the one before it was fine."""
    spec = SeedSpec(
        orgs=6, allocations=120, prefix=prefix, seed=15, inject={"missing_open": 2, "unbilled_closed": 3}
    )
    report = await seed(conn, spec, nc, provider)
    corr = f"{prefix}-worker-regression"
    rollout_ns = time.time_ns() - 600 * 1_000_000_000
    good = await conn.fetchrow(
        """SELECT d.revision, d.version FROM billing.worker_control c
           JOIN billing.worker_deployments d ON d.revision = c.revision WHERE c.id = 1"""
    )
    bad = await conn.fetchval(
        """INSERT INTO billing.worker_deployments (revision, version, rolled_out_at, faulty)
           SELECT max(revision) + 1, $1, to_timestamp($2::double precision / 1e9), true FROM billing.worker_deployments
           RETURNING revision""",
        BAD_VERSION,
        rollout_ns,
    )
    await conn.execute(
        "UPDATE billing.worker_control SET revision = $1, updated_at = now() WHERE id = 1", bad
    )
    # Before the rollout the worker processed events under the good version; after it, every event fails.
    await telemetry.log(conn, SERVICE_WORKER, "info", "processed provisioning.active", version=good["version"],
                        ts_ns=rollout_ns - 1_800 * 1_000_000_000)  # fmt: skip
    for minute in range(1, 6):
        await telemetry.log(
            conn,
            SERVICE_WORKER,
            "error",
            "panic: nil pointer dereference in ledger projection (event dropped)",
            correlation_id=corr,
            version=BAD_VERSION,
            ts_ns=rollout_ns + minute * 60 * 1_000_000_000,
        )
    if nc is not None:
        allocs = [r["id"] for r in await conn.fetch(
            "SELECT id FROM billing.allocations WHERE id LIKE $1 ORDER BY id LIMIT 150", f"{prefix}-alloc-%")]  # fmt: skip
        for alloc in allocs:
            await publish(nc, "provisioning.active", corr, trace_id, allocation_id=alloc)
        await nc.flush()
    await _trace(
        conn,
        corr,
        trace_id,
        SERVICE_WORKER,
        f"panic in ledger projection ({BAD_VERSION})",
        version=BAD_VERSION,
    )
    return IncidentReport(
        "worker-regression", "worker_failure", corr, trace_id, {}, report.injected, report.as_dict()
    )
