"""Build a consistent billing platform, then inject exactly the requested drift of each runbook kind."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from nats.aio.client import Client as NATS

from local_platform.db import usage_cost_minor
from local_platform.events import publish
from local_platform.provider_payments import ProviderOutcome, ProviderSeeder
from local_platform.telemetry import log

CHUNK = 50_000  # allocations (and payments) generated and copied per round
ALLOCATION_COPY_COLUMNS = [
    "id", "org_id", "project_id", "requested_by_user_id", "sku", "hourly_rate_minor", "status",
    "app_instance_id", "usage_source", "control_plane_component", "operating_mode", "control_plane_scope",
    "runtime_backend", "created_at", "activated_at", "releasing_at", "released_at", "correlation_id", "trace_id",
]  # fmt: skip
USAGE_COPY_COLUMNS = [
    "id", "allocation_id", "org_id", "project_id", "requested_by_user_id", "start_time", "end_time",
    "last_billed_at", "accrued_cost_minor", "app_instance_id", "usage_source", "control_plane_component",
    "operating_mode", "control_plane_scope", "runtime_backend", "idempotency_key", "created_by", "correlation_id",
]  # fmt: skip
PAYMENT_COPY_COLUMNS = [
    "id", "org_id", "user_id", "amount_minor", "status", "provider_ref", "ledger_entry_id", "correlation_id",
    "created_at", "completed_at",
]  # fmt: skip
LEDGER_COPY_COLUMNS = [
    "id", "org_id", "requested_by_user_id", "kind", "amount_minor", "usage_record_id", "payment_session_id",
    "idempotency_key", "actor", "correlation_id", "created_at",
]  # fmt: skip
# payment_drift: captured at the provider, the platform lost the credit or its link. The others are
# payments the platform left failed_reconcile, with what the provider really did.
PAYMENT_DRIFT_OUTCOMES = {
    "payment_drift": ProviderOutcome.CAPTURED,
    "payment_unpaid": ProviderOutcome.UNPAID,
    "payment_refunded": ProviderOutcome.REFUNDED,
    "payment_amount_mismatch": ProviderOutcome.AMOUNT_MISMATCH,
}
DRIFT_KINDS = ("missing_open", "orphan_open", "unbilled_closed", *PAYMENT_DRIFT_OUTCOMES)
SCREENFUL_IDS = 40  # injected ids `platform seed` prints inline; more go to --ids-file
CLEAN_PROVIDER_PAYMENTS = 10  # clean sessions also given a provider payment (the rest keep a placeholder ref)
BASE_TIME = datetime(2026, 11, 1, tzinfo=UTC)
SKUS = (("gpu-h100-x1", 350), ("gpu-a100-x1", 220), ("gpu-l40s-x1", 120), ("compute-vm-small", 9))
# usage_source, control_plane_component, operating_mode, control_plane_scope, runtime_backend
ATTRIBUTION = ("gpu_allocation", "scheduler", "managed", "regional", "kubernetes")


@dataclass
class SeedSpec:
    """What to build: sizes, a prefix to keep several seeds apart, the drift to inject."""

    orgs: int = 5
    allocations: int = 100
    seed: int = 7
    prefix: str = "t"
    inject: dict[str, int] = field(default_factory=dict)
    prepaid_every: int = 3
    publish_events_limit: int = 20_000

    def __post_init__(self) -> None:
        if self.orgs < 1:
            raise ValueError(f"--orgs must be at least 1, got {self.orgs}")
        if self.allocations < 0:
            raise ValueError(f"--allocations must not be negative, got {self.allocations}")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,15}", self.prefix):
            raise ValueError(
                f"--prefix must be 1-16 lower-case letters/digits starting with a letter, got {self.prefix!r}"
            )


@dataclass
class SeedReport:
    """What the seeder built and exactly what drift it injected (entity ids per kind)."""

    orgs: int
    allocations: int
    usage_records: int
    ledger_entries: int
    payment_sessions: int
    injected: dict[str, list[str]]
    events_published: int

    def summary(self, ids_file: Path | None = None) -> dict[str, Any]:
        """What `platform seed` prints: the ids inline only when they fit a screen, else counts, with
        every id written to ``ids_file`` (atomically) when one is given."""
        total = sum(len(ids) for ids in self.injected.values())
        doc = self.as_dict()
        if ids_file is None and total <= SCREENFUL_IDS:
            return doc
        # The same keys either way: a script reads "injected_ids" only when it is there.
        del doc["injected_ids"]
        if ids_file is not None:
            tmp = ids_file.with_name(ids_file.name + ".tmp")
            tmp.write_text(json.dumps(self.injected, indent=1))
            tmp.replace(ids_file)
            doc["injected_ids_file"] = str(ids_file)
        else:
            doc["injected_ids_omitted"] = f"{total} ids; --ids-file PATH writes them"
        return doc

    def as_dict(self, max_ids: int = 1000) -> dict[str, Any]:
        """JSON-ready form (ids capped at ``max_ids`` per kind)."""
        return {
            "orgs": self.orgs,
            "allocations": self.allocations,
            "usage_records": self.usage_records,
            "ledger_entries": self.ledger_entries,
            "payment_sessions": self.payment_sessions,
            "events_published": self.events_published,
            "injected": {k: len(v) for k, v in self.injected.items()},
            "injected_ids": {k: v[:max_ids] for k, v in self.injected.items()},
        }


def parse_inject(text: str) -> dict[str, int]:
    """Parse ``missing_open=2,orphan_open=1`` into counts, naming any bad part."""
    counts: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in DRIFT_KINDS:
            raise ValueError(
                f"--inject: unknown drift kind {name!r}; expected one of {', '.join(DRIFT_KINDS)}"
            )
        if not value.isdigit():
            raise ValueError(f"--inject: count for {name} must be a non-negative integer, got {value!r}")
        counts[name] = int(value)
    return counts


async def seed(
    conn: asyncpg.Connection,
    spec: SeedSpec,
    nc: NATS | None = None,
    provider: ProviderSeeder | None = None,
) -> SeedReport:
    """Build a consistent platform for ``spec`` (COPY-fast), then inject its drift.

    With ``provider``, the drifted payment sessions (and a few clean ones) reference real payments
    created at the provider; without it they keep placeholder refs the provider does not know.
    """
    outside = [k for k in PAYMENT_DRIFT_OUTCOMES if k != "payment_drift" and spec.inject.get(k)]
    if outside and provider is None:
        raise ValueError(
            f"--inject {', '.join(outside)}: needs the payment provider (PAYMENT_PROVIDER_URL or dev up)"
        )
    rng = random.Random(spec.seed)
    p = spec.prefix
    if await conn.fetchval("SELECT 1 FROM billing.orgs WHERE id LIKE $1 LIMIT 1", f"{p}-org-%"):
        # Checked before any write: a second seed with the same prefix would collide half-way.
        raise ValueError(f"--prefix {p!r} is already seeded in this database; choose another prefix")
    orgs, projects, users = [], [], []
    for o in range(spec.orgs):
        org_id = f"{p}-org-{o:04d}"
        mode = "prepaid" if spec.prepaid_every and o % spec.prepaid_every == 0 else "postpaid"
        orgs.append((org_id, f"Org {o}", mode, "USD"))
        for j in range(2):
            projects.append((f"{p}-prj-{o:04d}-{j}", org_id, f"project {j}"))
        for j in range(3):
            users.append((f"{p}-usr-{o:04d}-{j}", org_id, f"user{j}@org{o}.example"))

    id_base = await conn.fetchval("SELECT coalesce(max(id), 0) FROM billing.usage_records")
    ledger_base = await conn.fetchval("SELECT coalesce(max(id), 0) FROM billing.ledger_entries")
    counts = {"usage": 0, "ledger": 0, "payments": 0}
    # Events are kept only while they may still be published; a big seed never holds them all.
    events: list[tuple[str, dict[str, Any]]] | None = [] if nc is not None else None

    def event(subject: str, data: dict[str, Any]) -> None:
        nonlocal events
        if events is not None:
            events.append((subject, data))
            if len(events) > spec.publish_events_limit:
                events = None

    statuses = ("released",) * 12 + ("active",) * 5 + ("releasing", "release_failed")
    async with conn.transaction():
        await _skip_fk_checks(conn)
        await conn.copy_records_to_table(
            "orgs", schema_name="billing", records=orgs, columns=["id", "name", "billing_mode", "currency"]
        )
        await conn.copy_records_to_table(
            "projects", schema_name="billing", records=projects, columns=["id", "org_id", "name"]
        )
        await conn.copy_records_to_table(
            "users", schema_name="billing", records=users, columns=["id", "org_id", "email"]
        )
        # Streamed in chunks: memory stays flat from a hundred rows to ten million.
        for chunk_start in range(0, spec.allocations, CHUNK):
            allocations: list[tuple[Any, ...]] = []
            usage: list[tuple[Any, ...]] = []
            ledger: list[tuple[Any, ...]] = []
            for a in range(chunk_start, min(spec.allocations, chunk_start + CHUNK)):
                o = a % spec.orgs
                org_id = orgs[o][0]
                project_id = f"{p}-prj-{o:04d}-{rng.randrange(2)}"
                user_id = f"{p}-usr-{o:04d}-{rng.randrange(3)}"
                sku, rate = SKUS[rng.randrange(len(SKUS))]
                status = statuses[rng.randrange(len(statuses))]
                alloc_id = f"{p}-alloc-{a:07d}"
                activated = BASE_TIME + timedelta(seconds=rng.randrange(0, 20 * 86400))
                duration = rng.randrange(600, 3 * 86400)
                releasing = activated + timedelta(seconds=duration) if status != "active" else None
                released = releasing if status == "released" else None
                corr = f"{p}-corr-{a:07d}"
                trace = f"{rng.getrandbits(128):032x}"
                app_instance = f"{p}-app-{a % 97:03d}" if a % 4 == 0 else None
                allocations.append(
                    (
                        alloc_id, org_id, project_id, user_id, sku, rate, status, app_instance, *ATTRIBUTION,
                        activated, activated, releasing, released, corr, trace,
                    )
                )  # fmt: skip
                usage_id = id_base + a + 1
                closed = status == "released"
                cost = usage_cost_minor(duration, rate) if closed else 0
                usage.append(
                    (
                        usage_id, alloc_id, org_id, project_id, user_id, activated, released,
                        released if closed else activated, cost, app_instance, *ATTRIBUTION,
                        f"usage-open:{alloc_id}", "gpuaas-billing-worker", corr,
                    )
                )  # fmt: skip
                event("provisioning.active", {"allocation_id": alloc_id, "org_id": org_id, "at": activated})
                if closed and cost > 0:
                    counts["ledger"] += 1
                    ledger.append(
                        (
                            ledger_base + counts["ledger"], org_id, user_id, "usage_debit", -cost, usage_id, None,
                            f"usage-debit:{usage_id}", "gpuaas-billing-worker", corr, released,
                        )
                    )  # fmt: skip
                    event("provisioning.releasing.completed", {"allocation_id": alloc_id, "at": released})
                    event("billing.usage_debited", {"allocation_id": alloc_id, "amount_minor": cost})
                elif status == "release_failed":
                    event("provisioning.release_failed", {"allocation_id": alloc_id, "at": releasing})
            await _copy(conn, "allocations", allocations, ALLOCATION_COPY_COLUMNS)
            await _copy(conn, "usage_records", usage, USAGE_COPY_COLUMNS)
            await _copy(conn, "ledger_entries", ledger, LEDGER_COPY_COLUMNS)
            counts["usage"] += len(usage)

        payment_count = max(spec.orgs, spec.allocations // 10)
        for chunk_start in range(0, payment_count, CHUNK):
            payments: list[tuple[Any, ...]] = []
            credits: list[tuple[Any, ...]] = []
            for i in range(chunk_start, min(payment_count, chunk_start + CHUNK)):
                o = i % spec.orgs
                org_id = orgs[o][0]
                amount = 50_000 + rng.randrange(0, 200_000)
                counts["ledger"] += 1
                pay_id = f"{p}-pay-{i:07d}"
                created = BASE_TIME + timedelta(seconds=rng.randrange(0, 20 * 86400))
                corr = f"{p}-corr-pay-{i:07d}"
                user = f"{p}-usr-{o:04d}-0"
                # The session's ledger link is set below, once its credit exists.
                payments.append(
                    (pay_id, org_id, user, amount, "completed", f"cs_{pay_id}", None, corr, created, created)
                )
                credits.append(
                    (
                        ledger_base + counts["ledger"], org_id, user, "payment_credit", amount, None, pay_id,
                        f"payment-credit:{pay_id}", "gpuaas-webhook-worker", corr, created,
                    )
                )  # fmt: skip
                event("payments.balance_credited", {"payment_session_id": pay_id, "amount_minor": amount})
            await _copy(conn, "payment_sessions", payments, PAYMENT_COPY_COLUMNS)
            await _copy(conn, "ledger_entries", credits, LEDGER_COPY_COLUMNS)
            counts["payments"] += len(payments)
        await conn.execute(
            """UPDATE billing.payment_sessions ps SET ledger_entry_id = le.id
               FROM billing.ledger_entries le
               WHERE le.payment_session_id = ps.id AND le.kind = 'payment_credit' AND ps.id LIKE $1""",
            f"{p}-pay-%",
        )
        for table in ("usage_records", "ledger_entries"):
            await conn.execute(
                f"SELECT setval(pg_get_serial_sequence('billing.{table}', 'id'),"
                f" (SELECT coalesce(max(id), 1) FROM billing.{table}))"
            )
        injected = await _inject(conn, spec, rng)
        if provider is not None:
            await _provider_payments(conn, spec, provider, injected)

    published = 0
    if nc is not None and events is not None:
        for subject, data in events:
            corr = str(data.get("allocation_id") or data.get("payment_session_id"))
            # Flagged as imported history: the billing worker acknowledges it without re-applying it.
            await publish(nc, subject, corr, "", replayed=True, **data)
        await nc.flush()
        published = len(events)
    return SeedReport(
        len(orgs),
        spec.allocations,
        counts["usage"],
        counts["ledger"],
        counts["payments"],
        injected,
        published,
    )


async def _skip_fk_checks(conn: asyncpg.Connection) -> None:
    """Skip per-row foreign-key triggers for this transaction when allowed (superuser, e.g. embedded).

    The seeder writes parents before children by construction; the checks only cost time (about half
    of a large seed). Without the privilege the checks simply run.
    """
    try:
        async with conn.transaction():  # a savepoint: a refusal must not abort the seed's transaction
            await conn.execute("SET LOCAL session_replication_role = replica")
    except asyncpg.InsufficientPrivilegeError:
        return


async def _copy(
    conn: asyncpg.Connection, table: str, records: list[tuple[Any, ...]], columns: list[str]
) -> None:
    if records:
        await conn.copy_records_to_table(table, schema_name="billing", records=records, columns=columns)


async def _inject(conn: asyncpg.Connection, spec: SeedSpec, rng: random.Random) -> dict[str, list[str]]:
    """Inject each requested kind of drift into distinct, deterministic entities."""
    p = spec.prefix
    # The classic four kinds are always reported; the provider outcomes when asked for.
    injected: dict[str, list[str]] = {kind: [] for kind in DRIFT_KINDS[:4]}
    open_allocs = [
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM billing.allocations WHERE id LIKE $1 AND status <> 'released' ORDER BY id",
            f"{p}-alloc-%",
        )
    ]
    released = [
        r["id"]
        for r in await conn.fetch(
            """SELECT a.id FROM billing.allocations a JOIN billing.usage_records u ON u.allocation_id = a.id
           WHERE a.id LIKE $1 AND a.status = 'released' AND u.accrued_cost_minor > 0 ORDER BY a.id""",
            f"{p}-alloc-%",
        )
    ]
    payments = [
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM billing.payment_sessions WHERE id LIKE $1 ORDER BY id", f"{p}-pay-%"
        )
    ]
    want = {k: spec.inject.get(k, 0) for k in DRIFT_KINDS}
    if want["missing_open"] > len(open_allocs):
        raise ValueError(
            f"--inject missing_open={want['missing_open']}: only {len(open_allocs)} open allocations"
        )
    if want["orphan_open"] + want["unbilled_closed"] > len(released):
        raise ValueError(
            f"--inject orphan_open+unbilled_closed={want['orphan_open'] + want['unbilled_closed']}:"
            f" only {len(released)} released allocations with cost"
        )
    want_payments = sum(want[k] for k in PAYMENT_DRIFT_OUTCOMES)
    if want_payments > len(payments):
        raise ValueError(
            f"--inject {'+'.join(k for k in PAYMENT_DRIFT_OUTCOMES if want[k])}={want_payments}:"
            f" only {len(payments)} payment sessions"
        )

    missing = sorted(rng.sample(open_allocs, want["missing_open"]))
    picked = rng.sample(released, want["orphan_open"] + want["unbilled_closed"])
    orphans, unbilled = sorted(picked[: want["orphan_open"]]), sorted(picked[want["orphan_open"] :])
    picked_payments = rng.sample(payments, want_payments)
    by_outcome: dict[str, list[str]] = {}
    for kind in PAYMENT_DRIFT_OUTCOMES:
        by_outcome[kind], picked_payments = (
            sorted(picked_payments[: want[kind]]),
            picked_payments[want[kind] :],
        )
    drifted_payments = by_outcome["payment_drift"]

    # Missing open usage: the worker never saw provisioning.active.
    await conn.execute(
        "DELETE FROM billing.usage_records u USING unnest($1::text[]) AS t(alloc) WHERE u.allocation_id = t.alloc",
        missing,
    )
    # Orphan open usage: the release was never metered (usage left open, no debit).
    await conn.execute(
        """DELETE FROM billing.ledger_entries le USING billing.usage_records u, unnest($1::text[]) AS t(alloc)
           WHERE u.allocation_id = t.alloc AND le.usage_record_id = u.id AND le.kind = 'usage_debit'""",
        orphans,
    )
    await conn.execute(
        """UPDATE billing.usage_records u SET end_time = NULL, accrued_cost_minor = 0, last_billed_at = start_time
           FROM unnest($1::text[]) AS t(alloc) WHERE u.allocation_id = t.alloc""",
        orphans,
    )
    # Unbilled closed usage: the worker crashed between closing usage and posting the debit.
    await conn.execute(
        """DELETE FROM billing.ledger_entries le USING billing.usage_records u, unnest($1::text[]) AS t(alloc)
           WHERE u.allocation_id = t.alloc AND le.usage_record_id = u.id AND le.kind = 'usage_debit'""",
        unbilled,
    )
    # Payment drift: even ones lost their credit (failed_reconcile), odd ones only the link.
    lost_credit = drifted_payments[0::2]
    await conn.execute(
        "UPDATE billing.payment_sessions SET ledger_entry_id = NULL WHERE id = ANY($1::text[])",
        drifted_payments,
    )
    await conn.execute(
        "UPDATE billing.payment_sessions SET status = 'failed_reconcile' WHERE id = ANY($1::text[])",
        lost_credit,
    )
    await conn.execute(
        "DELETE FROM billing.ledger_entries WHERE kind = 'payment_credit' AND payment_session_id = ANY($1::text[])",
        lost_credit,
    )
    injected["missing_open"] = missing
    injected["orphan_open"] = orphans
    injected["unbilled_closed"] = unbilled
    # The other outcomes: the platform left the session failed_reconcile, with no credit.
    failed_only = [pay for kind, ids in by_outcome.items() if kind != "payment_drift" for pay in ids]
    await conn.execute(
        """UPDATE billing.payment_sessions SET ledger_entry_id = NULL, status = 'failed_reconcile'
           WHERE id = ANY($1::text[])""",
        failed_only,
    )
    await conn.execute(
        "DELETE FROM billing.ledger_entries WHERE kind = 'payment_credit' AND payment_session_id = ANY($1::text[])",
        failed_only,
    )
    # The outcome-specific kinds are reported when asked for; the classic four always are.
    injected.update({kind: ids for kind, ids in by_outcome.items() if ids or kind == "payment_drift"})
    return injected


async def _provider_payments(
    conn: asyncpg.Connection, spec: SeedSpec, provider: ProviderSeeder, injected: dict[str, list[str]]
) -> None:
    """Create the provider's side of the drifted (and a few clean) sessions; point provider_ref at it.

    Where the provider's success event went is written as the webhook worker's log lines: a lost
    link's event was received (its credit exists), a lost credit's was received but not applied at even
    positions and never received at odd ones, an amount mismatch's was received; unpaid and refunded
    sessions have no line.
    """
    drifted = {pay: kind for kind in PAYMENT_DRIFT_OUTCOMES for pay in injected.get(kind, [])}
    clean = await conn.fetch(
        """SELECT id FROM billing.payment_sessions WHERE id LIKE $1 AND NOT (id = ANY($2::text[]))
           ORDER BY id LIMIT $3""",
        f"{spec.prefix}-pay-%",
        list(drifted),
        CLEAN_PROVIDER_PAYMENTS,
    )
    sessions = await conn.fetch(
        """SELECT p.id, p.amount_minor, o.currency, p.correlation_id FROM billing.payment_sessions p
           JOIN billing.orgs o ON o.id = p.org_id WHERE p.id = ANY($1::text[]) ORDER BY p.id""",
        [*drifted, *(r["id"] for r in clean)],
    )
    items = [
        (PAYMENT_DRIFT_OUTCOMES[drifted.get(s["id"], "payment_drift")], s["id"], s["amount_minor"], s["currency"], i)
        for i, s in enumerate(sessions)
    ]  # fmt: skip
    refs = await provider.create_many(items)
    await conn.execute(
        """UPDATE billing.payment_sessions p SET provider_ref = v.ref
           FROM unnest($1::text[], $2::text[]) AS v(id, ref) WHERE p.id = v.id""",
        [s["id"] for s in sessions],
        refs,
    )
    lost_credit = set(injected.get("payment_drift", [])[0::2])
    for i, (session, ref) in enumerate(zip(sessions, refs, strict=True)):
        kind = drifted.get(session["id"])
        if kind is None or (kind == "payment_drift" and session["id"] in lost_credit and i % 2):
            continue  # clean: not this run's concern; odd lost credits: the event never arrived
        if kind not in ("payment_drift", "payment_amount_mismatch"):
            continue
        applied = kind == "payment_drift" and session["id"] not in lost_credit
        await log(
            conn,
            "gpuaas-webhook-worker",
            "warn" if applied else "error",
            "payment_intent.succeeded received; "
            + ("credit posted, session link failed" if applied else "balance credit failed: reconcile later"),
            correlation_id=session["correlation_id"],
            event_type="payment_intent.succeeded",
            payment_intent=ref,
            payment_session_id=session["id"],
        )
