"""Activities on the billing data in Postgres: diagnosis checks, reconciliation, plans, apply, duplicates.

Every check is set-based SQL; findings and plan actions are written to Postgres, never returned whole.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, NamedTuple

import asyncpg
from temporalio import activity

from activities.errors import bad_input, dependency_down, not_found
from activities.heartbeat import heartbeating
from activities.scope_sql import (
    ALLOCATION_COLUMNS,
    LEDGER_COLUMNS,
    PAYMENT_COLUMNS,
    USAGE_COLUMNS,
    columns_as,
    scope_predicate,
    scope_prefilter,
)
from workflows import names
from workflows.models import (
    ApiAction,
    ApplyRequest,
    ApplySummary,
    BlastRadius,
    BlastRadiusRequest,
    BlastRadiusResult,
    CheckResult,
    Criterion,
    DriftKind,
    PlanRequest,
    PlanSummary,
    ReconcileRequest,
    ReconcileSummary,
    RemediationRequest,
    RunRef,
    Scope,
    VerificationRequest,
)

OPEN_STATUSES = "('active', 'releasing', 'release_failed')"
RECONCILE_WORK_MEM = "256MB"
# asyncpg prepares every statement; after five runs Postgres may switch to a generic plan that ignores
# the actual scope or batch (measured: an apply batch went from 35 ms to over 300 ms on a 1 M-row plan).
CUSTOM_PLANS = "SET LOCAL plan_cache_mode = force_custom_plan"
# Cost of closing a usage record at the allocation's release: the platform's pricing rule in SQL.
# When an orphan's release time was never recorded, close it at the last time it was billed: never
# charge for time nothing proves was used.
CLOSE_AT = "coalesce(a.released_at, a.releasing_at, u.last_billed_at, u.start_time)"
CLOSE_COST = (
    f"((floor(extract(epoch from ({CLOSE_AT} - u.start_time)))::bigint * a.hourly_rate_minor + 3599) / 3600)"
)

# Driver errors that mean "the database is unreachable or restarting": retry them.
TRANSIENT = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InterfaceError,
    TimeoutError,
)


class Check(NamedTuple):
    """One runbook check in two steps: the drifted keys first (index-only anti-joins over narrow
    indexes), then the finding rows for just those keys (a lookup per key: ``LATERAL ... OFFSET 0``
    keeps the planner from scanning a whole table to decorate a handful of drifted rows)."""

    candidates: str  # SELECT of one column: the drifted entity's key
    details: str  # SELECT of finding rows FROM cand (the materialised candidates)
    params: list[str]

    def statement(self) -> str:
        """One SELECT producing the finding rows (one snapshot)."""
        return f"WITH cand(key) AS MATERIALIZED ({self.candidates}) {self.details}"


def _candidates(scope: Scope, inside: str, outside: str | None, key: str, exact: str) -> str:
    """Drifted keys: ``inside`` keys with no match per ``exact`` (a NOT EXISTS over the whole table).

    Globally that anti-join is a merge of two sorted narrow indexes. For a scope, the keys are first
    narrowed by subtracting ``outside`` (the same scope's matches, a small hashed EXCEPT), then the few
    left are checked exactly, so a match recorded under another scope still counts.
    """
    if scope.is_global or outside is None:
        return f"SELECT {key} FROM ({inside}) k WHERE NOT EXISTS ({exact})"
    return f"SELECT {key} FROM (({inside}) EXCEPT ({outside})) k WHERE NOT EXISTS ({exact})"


def _checks(scope: Scope, first: int) -> dict[DriftKind, Check]:
    """The runbook's four reconciliation checks, each as candidates + details, with their params."""
    params = [value for value in scope.model_dump().values() if value]
    open_pred, _ = scope_predicate(scope, columns_as(ALLOCATION_COLUMNS, "c"), first)
    usage_pred, _ = scope_predicate(scope, columns_as(USAGE_COLUMNS, "o"), first)
    pay_pred, pay_params = scope_predicate(scope, PAYMENT_COLUMNS, first)
    ledger_pre = scope_prefilter(scope, columns_as(LEDGER_COLUMNS, "l"), first)
    if ledger_pre is None and scope.project_id:
        # The ledger has no project: its project's org is a cheap superset.
        number = first + [f for f, v in scope.model_dump().items() if v].index("project_id")
        ledger_pre = f"l.org_id = (SELECT pr.org_id FROM billing.projects pr WHERE pr.id = ${number})"
    open_allocations = (
        f"SELECT c.id FROM billing.allocations c WHERE c.status IN {OPEN_STATUSES} AND {open_pred}"
    )
    open_usage = (
        f"SELECT o.allocation_id FROM billing.usage_records o WHERE o.end_time IS NULL AND {usage_pred}"
    )
    billable = f"""SELECT o.id FROM billing.usage_records o
                   WHERE o.end_time IS NOT NULL AND o.accrued_cost_minor > 0 AND {usage_pred}"""
    debits = (
        None
        if ledger_pre is None
        else f"SELECT l.usage_record_id FROM billing.ledger_entries l WHERE l.kind = 'usage_debit' AND {ledger_pre}"
    )
    return {
        DriftKind.MISSING_OPEN_USAGE: Check(
            _candidates(
                scope,
                open_allocations,
                open_usage,
                "k.id",
                "SELECT 1 FROM billing.usage_records u WHERE u.allocation_id = k.id AND u.end_time IS NULL",
            ),
            """SELECT 'missing_open_usage', 'allocation', a.id, a.org_id, a.project_id, a.requested_by_user_id, a.id,
                      0::bigint, jsonb_build_object('status', a.status, 'activated_at', a.activated_at)
               FROM cand CROSS JOIN LATERAL (
                   SELECT * FROM billing.allocations a WHERE a.id = cand.key OFFSET 0) a""",
            params,
        ),
        DriftKind.ORPHAN_OPEN_USAGE: Check(
            _candidates(
                scope,
                open_usage,
                open_allocations,
                "k.allocation_id",
                f"SELECT 1 FROM billing.allocations c WHERE c.id = k.allocation_id AND c.status IN {OPEN_STATUSES}",
            ),
            f"""SELECT 'orphan_open_usage', 'usage_record', u.id::text, u.org_id, u.project_id, u.requested_by_user_id,
                       u.allocation_id, {CLOSE_COST},
                       jsonb_build_object('allocation_status', a.status, 'released_at', a.released_at,
                                          'start_time', u.start_time)
                FROM cand
                CROSS JOIN LATERAL (SELECT * FROM billing.usage_records u
                                    WHERE u.allocation_id = cand.key AND u.end_time IS NULL OFFSET 0) u
                CROSS JOIN LATERAL (SELECT * FROM billing.allocations a WHERE a.id = u.allocation_id OFFSET 0) a""",
            params,
        ),
        DriftKind.UNBILLED_CLOSED_USAGE: Check(
            _candidates(
                scope,
                billable,
                debits,
                "k.id",
                "SELECT 1 FROM billing.ledger_entries l WHERE l.usage_record_id = k.id AND l.kind = 'usage_debit'",
            ),
            """SELECT 'unbilled_closed_usage', 'usage_record', u.id::text, u.org_id, u.project_id,
                      u.requested_by_user_id, u.allocation_id, u.accrued_cost_minor,
                      jsonb_build_object('end_time', u.end_time)
               FROM cand CROSS JOIN LATERAL (
                   SELECT * FROM billing.usage_records u WHERE u.id = cand.key OFFSET 0) u""",
            params,
        ),
        DriftKind.PAYMENT_DRIFT: Check(
            f"""SELECT p.id FROM billing.payment_sessions p
                WHERE (p.status = 'failed_reconcile' OR (p.status = 'completed' AND p.ledger_entry_id IS NULL))
                  AND {pay_pred}""",
            """SELECT 'payment_drift', 'payment_session', p.id, p.org_id, NULL, p.user_id, NULL, p.amount_minor,
                      jsonb_build_object('status', p.status, 'existing_credit_id',
                          (SELECT l.id FROM billing.ledger_entries l
                           WHERE l.payment_session_id = p.id AND l.kind = 'payment_credit'))
               FROM cand CROSS JOIN LATERAL (
                   SELECT * FROM billing.payment_sessions p WHERE p.id = cand.key OFFSET 0) p""",
            pay_params,
        ),
    }


async def validate_scope(conn: asyncpg.Connection | asyncpg.Pool, scope: Scope) -> None:
    """Refuse scopes naming unknown entities or contradicting each other (BadInput names the field)."""
    lookups = (
        ("org_id", "SELECT id, id AS org_id FROM billing.orgs WHERE id = $1"),
        ("project_id", "SELECT id, org_id FROM billing.projects WHERE id = $1"),
        ("user_id", "SELECT id, org_id FROM billing.users WHERE id = $1"),
        (
            "allocation_id",
            "SELECT id, org_id, project_id, requested_by_user_id FROM billing.allocations WHERE id = $1",
        ),
    )
    for field, sql in lookups:
        value = getattr(scope, field)
        if value is None:
            continue
        row = await conn.fetchrow(sql, value)
        if row is None:
            raise bad_input(f"scope.{field}: unknown {field.removesuffix('_id')} {value!r}")
        if scope.org_id and row["org_id"] != scope.org_id:
            raise bad_input(
                f"scope.{field}: {value!r} belongs to org {row['org_id']!r}, not {scope.org_id!r}"
            )
        if field == "allocation_id":
            if scope.project_id and row["project_id"] != scope.project_id:
                raise bad_input(f"scope.allocation_id: {value!r} is outside project {scope.project_id!r}")
            if scope.user_id and row["requested_by_user_id"] != scope.user_id:
                raise bad_input(f"scope.allocation_id: {value!r} was not requested by user {scope.user_id!r}")


class BillingDatabaseActivities:
    """Set-based checks and corrective writes on the billing tables."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # ------------------------------------------------------------------ diagnosis

    @activity.defn(name=names.CHECK_POSTGRES)
    async def check_postgres(self, ref: RunRef) -> CheckResult:
        """Postgres connectivity and round-trip latency."""
        started = time.perf_counter()
        try:
            version = await self._pool.fetchval("SHOW server_version")
        except TRANSIENT as exc:
            return CheckResult(
                check="postgres", status="unreachable", headline=f"Postgres unreachable: {exc!r}"
            )
        ms = int((time.perf_counter() - started) * 1000)
        status = "ok" if ms < 500 else "warn"
        await self._diagnosis(ref, "postgres", status, {"latency_ms": ms, "version": version})
        return CheckResult(
            check="postgres",
            status=status,
            headline=f"connected, {ms} ms round trip (PostgreSQL {version})",
            counts={"latency_ms": ms},
        )

    @activity.defn(name=names.CHECK_OUTBOX)
    async def check_outbox(self, ref: RunRef) -> CheckResult:
        """Outbox relay health: backlog, age of the oldest unpublished row, failed rows."""
        row = await self._fetchrow(
            """SELECT count(*) FILTER (WHERE published_at IS NULL) AS backlog,
                      coalesce(extract(epoch from now() - min(created_at) FILTER (WHERE published_at IS NULL)), 0)::int
                          AS oldest_s,
                      count(*) FILTER (WHERE failed_at IS NOT NULL AND published_at IS NULL) AS failed,
                      coalesce(extract(epoch from now() - max(published_at)), 0)::int AS since_publish_s
               FROM billing.outbox"""
        )
        backlog, oldest, failed = int(row["backlog"]), int(row["oldest_s"]), int(row["failed"])
        stuck = backlog > 0 and int(row["since_publish_s"]) >= 300
        if oldest >= 300 or failed > 0 or stuck:
            status = "critical"
        elif oldest >= 60 or backlog > 100:
            status = "warn"
        else:
            status = "ok"
        counts = {"backlog": backlog, "oldest_seconds": oldest, "failed": failed}
        await self._diagnosis(ref, "outbox_relay", status, counts)
        return CheckResult(
            check="outbox_relay",
            status=status,
            headline=f"{backlog} unpublished, oldest {oldest}s, {failed} failed",
            counts=counts,
        )

    @activity.defn(name=names.CHECK_DATA_CONSISTENCY)
    async def check_data_consistency(self, ref: RunRef) -> CheckResult:
        """Usage lifecycle, ledger projection, allocation status boundary and attribution boundary."""
        usage_pred, params = scope_predicate(ref.scope, USAGE_COLUMNS, 1)
        alloc_pred, _ = scope_predicate(ref.scope, ALLOCATION_COLUMNS, 1)
        lifecycle = await self._fetchval(
            f"""SELECT count(*) FROM billing.usage_records u WHERE {usage_pred}
                AND (u.end_time < u.start_time OR u.last_billed_at > coalesce(u.end_time, 'infinity')
                     OR (u.end_time IS NULL AND u.accrued_cost_minor > 0))""",
            *params,
        )
        boundary = await self._fetchval(
            f"""SELECT count(*) FROM billing.allocations a WHERE {alloc_pred}
                AND ((a.status = 'released' AND a.released_at IS NULL)
                     OR (a.status IN ('releasing', 'release_failed') AND a.releasing_at IS NULL))""",
            *params,
        )
        attribution = await self._fetchval(
            f"""SELECT count(*) FROM billing.usage_records u JOIN billing.allocations a ON a.id = u.allocation_id
                WHERE {usage_pred} AND (u.app_instance_id IS DISTINCT FROM a.app_instance_id
                    OR u.usage_source <> a.usage_source OR u.control_plane_component <> a.control_plane_component
                    OR u.operating_mode <> a.operating_mode OR u.control_plane_scope <> a.control_plane_scope
                    OR u.runtime_backend <> a.runtime_backend)""",
            *params,
        )
        projection = await self._fetchval(
            f"""SELECT count(*) FROM (
                  SELECT u.requested_by_user_id FROM billing.usage_records u
                  LEFT JOIN billing.ledger_entries l ON l.usage_record_id = u.id AND l.kind = 'usage_debit'
                  WHERE u.end_time IS NOT NULL AND {usage_pred}
                  GROUP BY 1 HAVING sum(u.accrued_cost_minor) <> -coalesce(sum(l.amount_minor), 0)) d""",
            *params,
        )
        counts = {
            "usage_lifecycle": int(lifecycle),
            "allocation_boundary": int(boundary),
            "attribution_boundary": int(attribution),
            "ledger_projection_users": int(projection),
        }
        problems = [f"{k}={v}" for k, v in counts.items() if v]
        status = "warn" if problems else "ok"
        await self._diagnosis(ref, "data_consistency", status, counts)
        return CheckResult(
            check="data_consistency",
            status=status,
            headline="consistent" if not problems else "inconsistent: " + ", ".join(problems),
            counts=counts,
        )

    @activity.defn(name=names.ASSESS_BLAST_RADIUS)
    async def assess_blast_radius(self, request: BlastRadiusRequest) -> BlastRadiusResult:
        """Single dispute, one org, or widespread: from drift in and around the scope and worker health."""
        scope = request.ref.scope
        in_scope = await self._count_drift(scope)
        # Around the scope: drift anywhere on the platform, counted by org.
        orgs = await self._fetchval(
            """SELECT count(DISTINCT org_id) FROM (
                 SELECT a.org_id FROM billing.allocations a WHERE a.status IN ('active','releasing','release_failed')
                   AND NOT EXISTS (SELECT 1 FROM billing.usage_records u WHERE u.allocation_id = a.id AND u.end_time IS NULL)
                 UNION ALL
                 SELECT u.org_id FROM billing.usage_records u WHERE u.end_time IS NOT NULL AND u.accrued_cost_minor > 0
                   AND NOT EXISTS (SELECT 1 FROM billing.ledger_entries l WHERE l.usage_record_id = u.id
                                   AND l.kind = 'usage_debit')
                 UNION ALL
                 SELECT p.org_id FROM billing.payment_sessions p WHERE p.status = 'failed_reconcile'
                   OR (p.status = 'completed' AND p.ledger_entry_id IS NULL)) d"""
        )
        # Platform-wide signals widen only a platform-wide run. A user's dispute or one org's drift keeps
        # its own risk (freeze and quorum follow its scope and plan); the wider degradation becomes a
        # named finding that points to the remediation handling it, or says none is running.
        wider: list[str] = []
        if request.worker_degraded:
            wider.append("billing worker consumer is critical (global degradation)")
        if int(orgs) >= request.widespread_org_threshold:
            wider.append(f"drift in {orgs} orgs (threshold {request.widespread_org_threshold})")
        platform: CheckResult | None = None
        if scope.is_global:
            radius = BlastRadius.WIDESPREAD
            reasons = ["scope is the whole platform", *wider]
        else:
            if scope.org_id and not (scope.project_id or scope.user_id or scope.allocation_id):
                radius, reasons = BlastRadius.ORG, ["confined to one org"]
            else:
                radius, reasons = BlastRadius.SINGLE, ["confined to a single user/project"]
            if wider:
                platform = await self._platform_degradation(request.ref, wider)
        await self._diagnosis(
            request.ref,
            "blast_radius",
            radius.value,
            {"drift_in_scope": in_scope, "orgs_with_drift": int(orgs), "reasons": reasons},
        )
        return BlastRadiusResult(
            radius=radius,
            drift_in_scope=in_scope,
            orgs_with_drift=int(orgs),
            reasons=reasons,
            platform_degradation=platform,
        )

    async def _platform_degradation(self, ref: RunRef, wider: list[str]) -> CheckResult:
        """The degradation outside this run's scope, and the platform-wide remediation handling it, if any."""
        global_id = RemediationRequest(correlation_id="x", requested_by="x").workflow_id()
        running = await self._fetchrow(
            """SELECT run_id, requested_by, correlation_id FROM remediation.runs
               WHERE workflow_id = $1 AND ended_at IS NULL ORDER BY started_at DESC LIMIT 1""",
            global_id,
        )
        if running is not None:
            handled = (
                f"{global_id} is running (run {running['run_id']}, correlation {running['correlation_id']}, "
                f"started by {running['requested_by']})"
            )
        else:
            handled = (
                "no platform-wide remediation is running: start one with `remediate start "
                "--correlation-id <incident> --trigger worker_failure`"
            )
        headline = f"outside this run's scope: {'; '.join(wider)}; {handled}"
        data = {
            "signals": wider,
            "global_workflow_id": global_id,
            "global_run_id": running and running["run_id"],
        }
        await self._diagnosis(ref, "platform_degradation", "warn", data)
        return CheckResult(check="platform_degradation", status="warn", headline=headline)

    # ------------------------------------------------------------------ reconcile and plan

    @activity.defn(name=names.RECONCILE)
    async def reconcile(self, request: ReconcileRequest) -> ReconcileSummary:
        """Run the four checks for the scope; findings go to Postgres (idempotent per pass)."""
        ref = request.ref
        counts: dict[str, int] = {}
        async with heartbeating(lambda: sorted(counts)):
            await self._reconcile_checks(request, counts)
        counts = {kind.value: counts[kind.value] for kind in DriftKind if kind.value in counts}
        total = sum(counts.values())
        await self._timeline(
            ref.run_id,
            f"reconcile:{request.pass_no}",
            "reconciling",
            f"reconciliation pass {request.pass_no}: {total} findings",
            counts,
        )
        return ReconcileSummary(pass_no=request.pass_no, counts=counts, total=total)

    async def _reconcile_checks(self, request: ReconcileRequest, counts: dict[str, int]) -> None:
        """Each check is one set-based INSERT ... SELECT into the findings table; the four run concurrently."""
        ref = request.ref

        async def run(kind: DriftKind, check: Check) -> None:
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    # Room for the scoped anti-joins' hashes; without it they spill to disk in batches.
                    await conn.execute(f"SET LOCAL work_mem = '{RECONCILE_WORK_MEM}'")
                    await conn.execute(CUSTOM_PLANS)
                    await conn.execute(
                        f"""INSERT INTO remediation.findings (run_id, pass, kind, entity_type, entity_id, org_id,
                                project_id, user_id, allocation_id, amount_minor, detail)
                            SELECT $1, $2, q.* FROM ({check.statement()}) q ON CONFLICT DO NOTHING""",
                        ref.run_id,
                        request.pass_no,
                        *check.params,
                    )
                    counts[kind.value] = int(
                        await conn.fetchval(
                            "SELECT count(*) FROM remediation.findings WHERE run_id = $1 AND pass = $2 AND kind = $3",
                            ref.run_id,
                            request.pass_no,
                            kind.value,
                        )
                    )
            except TRANSIENT as exc:
                raise dependency_down(f"Postgres unavailable: {type(exc).__name__}") from exc

        await asyncio.gather(*(run(kind, check) for kind, check in _checks(ref.scope, 3).items()))

    @activity.defn(name=names.BUILD_PLAN)
    async def build_plan(self, request: PlanRequest) -> PlanSummary:
        """Turn a pass's findings into ordered, idempotency-keyed actions and hash them."""
        async with heartbeating(lambda: request.plan_id):
            return await self._build_plan(request)

    async def _build_plan(self, request: PlanRequest) -> PlanSummary:
        ref = request.ref
        async with self._pool.acquire() as conn, conn.transaction():
            existing = await conn.fetchrow(
                "SELECT * FROM remediation.plans WHERE plan_id = $1", request.plan_id
            )
            if existing is None:
                await conn.execute(
                    """INSERT INTO remediation.plans (plan_id, run_id, pass, plan_hash, action_count, debit_total_minor,
                           credit_total_minor, counts_by_kind) VALUES ($1, $2, $3, '', 0, 0, 0, '{}')""",
                    request.plan_id,
                    ref.run_id,
                    request.pass_no,
                )
                await conn.execute(
                    """INSERT INTO remediation.plan_actions (plan_id, seq, kind, entity_type, entity_id, org_id, user_id,
                           amount_minor, idempotency_key, params)
                       SELECT $1, row_number() OVER (ORDER BY f.kind, f.entity_id), a.kind, f.entity_type, f.entity_id,
                              f.org_id, f.user_id, a.amount, a.key, f.detail
                       FROM remediation.findings f
                       CROSS JOIN LATERAL (SELECT
                         CASE f.kind
                           WHEN 'missing_open_usage' THEN 'open_usage_record'
                           WHEN 'orphan_open_usage' THEN 'close_orphan_usage'
                           WHEN 'unbilled_closed_usage' THEN 'post_usage_debit'
                           WHEN 'payment_drift' THEN CASE WHEN f.detail->>'existing_credit_id' IS NULL
                                                          THEN 'credit_payment' ELSE 'link_payment_credit' END
                         END AS kind,
                         CASE f.kind
                           WHEN 'missing_open_usage' THEN 0
                           WHEN 'payment_drift' THEN CASE WHEN f.detail->>'existing_credit_id' IS NULL
                                                          THEN f.amount_minor ELSE 0 END
                           ELSE -f.amount_minor
                         END AS amount,
                         CASE f.kind
                           WHEN 'missing_open_usage' THEN 'usage-open:' || f.entity_id
                           WHEN 'orphan_open_usage' THEN 'usage-debit:' || f.entity_id
                           WHEN 'unbilled_closed_usage' THEN 'usage-debit:' || f.entity_id
                           WHEN 'payment_drift' THEN CASE WHEN f.detail->>'existing_credit_id' IS NULL
                                                          THEN 'payment-credit:' || f.entity_id
                                                          ELSE 'payment-link:' || f.entity_id END
                         END AS key) a
                       WHERE f.run_id = $2 AND f.pass = $3""",
                    request.plan_id,
                    ref.run_id,
                    request.pass_no,
                )
                next_seq = int(
                    await conn.fetchval(
                        "SELECT coalesce(max(seq), 0) + 1 FROM remediation.plan_actions WHERE plan_id = $1",
                        request.plan_id,
                    )
                )
                next_seq = await self._plan_restriction_clears(conn, request, next_seq)
                if request.restart_worker:
                    await conn.execute(
                        """INSERT INTO remediation.plan_actions (plan_id, seq, kind, entity_type, entity_id, org_id,
                               amount_minor, idempotency_key) VALUES ($1, $2, 'restart_billing_worker', 'worker',
                               'billing-worker', '*', 0, $3)""",
                        request.plan_id,
                        next_seq,
                        f"worker-restart:{ref.run_id}",
                    )
                await conn.execute(
                    """UPDATE remediation.plans p SET
                         plan_hash = encode(sha256(convert_to(coalesce(s.canon, ''), 'UTF8')), 'hex'),
                         action_count = coalesce(s.n, 0), debit_total_minor = coalesce(s.debits, 0),
                         credit_total_minor = coalesce(s.credits, 0), counts_by_kind = coalesce(s.kinds, '{}')
                       FROM (SELECT string_agg(seq || '|' || kind || '|' || entity_id || '|' || amount_minor || '|'
                                               || idempotency_key, E'\\n' ORDER BY seq) AS canon,
                                    count(*) AS n,
                                    sum(amount_minor) FILTER (WHERE amount_minor < 0) AS debits,
                                    sum(amount_minor) FILTER (WHERE amount_minor > 0) AS credits,
                                    (SELECT jsonb_object_agg(kind, c) FROM (SELECT kind, count(*) c
                                        FROM remediation.plan_actions WHERE plan_id = $1 GROUP BY kind) k) AS kinds
                             FROM remediation.plan_actions WHERE plan_id = $1) s
                       WHERE p.plan_id = $1""",
                    request.plan_id,
                )
            plan = await conn.fetchrow("SELECT * FROM remediation.plans WHERE plan_id = $1", request.plan_id)
            api_rows = await conn.fetch(
                """SELECT seq, kind, org_id, idempotency_key FROM remediation.plan_actions WHERE plan_id = $1
                   AND kind IN ('clear_financial_restriction', 'restart_billing_worker') ORDER BY seq""",
                request.plan_id,
            )
        summary = PlanSummary(
            plan_id=plan["plan_id"],
            plan_hash=plan["plan_hash"],
            action_count=plan["action_count"],
            debit_total_minor=plan["debit_total_minor"],
            credit_total_minor=plan["credit_total_minor"],
            counts_by_kind=json.loads(plan["counts_by_kind"]),
            api_actions=[
                ApiAction(
                    seq=r["seq"], kind=r["kind"], org_id=r["org_id"], idempotency_key=r["idempotency_key"]
                )
                for r in api_rows
            ],
        )
        await self._timeline(
            ref.run_id,
            f"plan:{request.plan_id}",
            "reconciling",
            f"plan {summary.plan_id}: {summary.action_count} actions, debits "
            f"{summary.debit_total_minor}, credits {summary.credit_total_minor}",
            {"plan_hash": summary.plan_hash},
        )
        return summary

    async def _plan_restriction_clears(self, conn: asyncpg.Connection, request: PlanRequest, seq: int) -> int:
        """Plan clearing prepaid-depletion restrictions whose org the plan's credits bring back above zero."""
        pred, params = scope_predicate(request.ref.scope, {"org_id": "r.org_id"}, 2)
        rows = await conn.fetch(
            f"""SELECT r.org_id FROM billing.financial_restrictions r
                WHERE r.state = 'restricted' AND r.reason = 'prepaid_balance_depleted' AND {pred}
                  AND (SELECT coalesce(sum(amount_minor), 0) FROM billing.ledger_entries l WHERE l.org_id = r.org_id)
                    + (SELECT coalesce(sum(amount_minor), 0) FROM remediation.plan_actions pa
                       WHERE pa.plan_id = $1 AND pa.org_id = r.org_id) > 0
                ORDER BY r.org_id""",
            request.plan_id,
            *params,
        )
        for row in rows:
            await conn.execute(
                """INSERT INTO remediation.plan_actions (plan_id, seq, kind, entity_type, entity_id, org_id,
                       amount_minor, idempotency_key) VALUES ($1, $2, 'clear_financial_restriction', 'org', $3, $3,
                       0, $4)""",
                request.plan_id,
                seq,
                row["org_id"],
                f"restriction-clear:{row['org_id']}:{request.ref.run_id}",
            )
            seq += 1
        return seq

    # ------------------------------------------------------------------ apply

    @activity.defn(name=names.APPLY_PLAN)
    async def apply_plan(self, request: ApplyRequest) -> ApplySummary:
        """Apply the approved plan's Postgres actions in batches; resumable from the last committed batch."""
        plan = await self._fetchrow(
            "SELECT plan_hash FROM remediation.plans WHERE plan_id = $1", request.plan_id
        )
        if plan is None:
            raise not_found(f"plan {request.plan_id!r} does not exist")
        if plan["plan_hash"] != request.plan_hash:
            raise bad_input(
                f"plan {request.plan_id!r} changed since approval (hash mismatch); re-approval needed"
            )
        await self._execute(
            "UPDATE remediation.plans SET status = 'applying' WHERE plan_id = $1", request.plan_id
        )
        # The audit rows are committed with the effects, so they say exactly where to resume.
        last_seq = int(
            await self._fetchval(
                "SELECT coalesce(max(seq), 0) FROM remediation.applied_actions WHERE plan_id = $1",
                request.plan_id,
            )
        )
        progress = [last_seq]
        async with heartbeating(lambda: progress[0]):
            last_seq = await self._apply_batches(request, last_seq, progress)
        rows = await self._fetch(
            "SELECT outcome, count(*) AS n FROM remediation.applied_actions WHERE plan_id = $1 GROUP BY outcome",
            request.plan_id,
        )
        counts = {r["outcome"]: int(r["n"]) for r in rows}
        await self._execute(
            "UPDATE remediation.plans SET status = 'applied' WHERE plan_id = $1", request.plan_id
        )
        summary = ApplySummary(
            applied=counts.get("applied", 0),
            skipped_stale=counts.get("skipped_stale", 0),
            already_applied=counts.get("already_applied", 0),
            last_seq=last_seq,
        )
        await self._timeline(
            request.ref.run_id,
            f"apply:{request.plan_id}",
            "remediating",
            f"applied {summary.applied} actions, {summary.skipped_stale} stale skipped",
            {"approvers": ",".join(request.approvers)},
        )
        return summary

    async def _apply_batches(self, request: ApplyRequest, last_seq: int, progress: list[int]) -> int:
        """Apply the plan after ``last_seq`` in committed batches; returns the last applied seq."""
        while True:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(CUSTOM_PLANS)
                actions = await conn.fetch(
                    """SELECT * FROM remediation.plan_actions WHERE plan_id = $1 AND seq > $2
                       AND kind NOT IN ('clear_financial_restriction', 'restart_billing_worker')
                       ORDER BY seq LIMIT $3""",
                    request.plan_id,
                    last_seq,
                    request.batch_size,
                )
                if not actions:
                    return last_seq
                # Usage debits (the bulk of a worker outage's drift) go in one statement per batch.
                debits = [a["seq"] for a in actions if a["kind"] == "post_usage_debit"]
                if debits:
                    await self._apply_debits(conn, request, debits)
                for action in actions:
                    if action["kind"] != "post_usage_debit":
                        await self._apply_one(conn, request, action)
                last_seq = actions[-1]["seq"]
            progress[0] = last_seq

    @staticmethod
    async def _apply_debits(conn: asyncpg.Connection, request: ApplyRequest, seqs: list[int]) -> None:
        """Post a batch of usage debits set-based: same re-checks, keys and audit rows as one at a time."""
        await conn.execute(
            """WITH acts AS (
                   SELECT pa.seq, pa.entity_id::bigint AS usage_id, -pa.amount_minor AS cost, pa.idempotency_key
                   FROM remediation.plan_actions pa WHERE pa.plan_id = $1 AND pa.seq = ANY($2::int[])),
               before AS (
                   SELECT a.seq, to_jsonb(u) AS doc FROM acts a JOIN billing.usage_records u ON u.id = a.usage_id),
               posted AS (
                   INSERT INTO billing.ledger_entries (org_id, requested_by_user_id, kind, amount_minor,
                       usage_record_id, idempotency_key, actor, correlation_id)
                   SELECT u.org_id, u.requested_by_user_id, 'usage_debit', -u.accrued_cost_minor, u.id,
                          a.idempotency_key, $3, $4
                   FROM acts a JOIN billing.usage_records u ON u.id = a.usage_id
                   WHERE u.end_time IS NOT NULL AND u.accrued_cost_minor = a.cost
                     AND NOT EXISTS (SELECT 1 FROM billing.ledger_entries l
                                     WHERE l.usage_record_id = u.id AND l.kind = 'usage_debit')
                   ON CONFLICT DO NOTHING
                   RETURNING usage_record_id, to_jsonb(billing.ledger_entries.*) AS doc)
               INSERT INTO remediation.applied_actions (plan_id, seq, idempotency_key, kind, outcome, actor,
                   approvers, workflow_id, correlation_id, before, after)
               SELECT $1, a.seq, a.idempotency_key, 'post_usage_debit',
                      CASE WHEN p.doc IS NULL THEN 'skipped_stale' ELSE 'applied' END,
                      $5, $6, $7, $4, coalesce(b.doc, 'null'::jsonb), coalesce(p.doc, 'null'::jsonb)
               FROM acts a LEFT JOIN before b USING (seq) LEFT JOIN posted p ON p.usage_record_id = a.usage_id
               ON CONFLICT (plan_id, seq) DO NOTHING""",
            request.plan_id,
            seqs,
            f"remediation:{request.actor}",
            request.ref.correlation_id,
            request.actor,
            request.approvers,
            request.ref.workflow_id,
        )

    async def _apply_one(
        self, conn: asyncpg.Connection, request: ApplyRequest, action: asyncpg.Record
    ) -> None:
        """Re-check the finding, apply the effect and write the audit row, all in the caller's transaction."""
        kind, entity, amount, key = (
            action["kind"],
            action["entity_id"],
            action["amount_minor"],
            action["idempotency_key"],
        )
        actor = f"remediation:{request.actor}"
        corr = request.ref.correlation_id
        before: Any = None
        after: Any = None
        if kind == "open_usage_record":
            before = await conn.fetchval(
                "SELECT to_jsonb(a) FROM billing.allocations a WHERE id = $1", entity
            )
            after = await conn.fetchval(
                f"""INSERT INTO billing.usage_records (allocation_id, org_id, project_id, requested_by_user_id,
                        start_time, last_billed_at, app_instance_id, usage_source, control_plane_component,
                        operating_mode, control_plane_scope, runtime_backend, idempotency_key, created_by,
                        correlation_id)
                    SELECT a.id, a.org_id, a.project_id, a.requested_by_user_id, a.activated_at, a.activated_at,
                           a.app_instance_id, a.usage_source, a.control_plane_component, a.operating_mode,
                           a.control_plane_scope, a.runtime_backend, $2, $3, $4
                    FROM billing.allocations a WHERE a.id = $1 AND a.status IN {OPEN_STATUSES}
                      AND NOT EXISTS (SELECT 1 FROM billing.usage_records u
                                      WHERE u.allocation_id = a.id AND u.end_time IS NULL)
                    ON CONFLICT DO NOTHING RETURNING to_jsonb(billing.usage_records.*)""",
                entity,
                key,
                actor,
                corr,
            )
        elif kind == "close_orphan_usage":
            before = await conn.fetchval(
                "SELECT to_jsonb(u) FROM billing.usage_records u WHERE id = $1", int(entity)
            )
            after = await conn.fetchval(
                f"""UPDATE billing.usage_records u SET end_time = {CLOSE_AT},
                        last_billed_at = {CLOSE_AT}, accrued_cost_minor = $2
                    FROM billing.allocations a
                    WHERE u.id = $1 AND a.id = u.allocation_id AND u.end_time IS NULL
                      AND a.status NOT IN {OPEN_STATUSES} AND {CLOSE_COST} = $2
                    RETURNING to_jsonb(u.*)""",
                int(entity),
                -amount,
            )
            if after is not None and amount != 0:
                await self._post_debit(conn, int(entity), -amount, key, actor, corr)
        elif kind == "post_usage_debit":
            before = await conn.fetchval(
                "SELECT to_jsonb(u) FROM billing.usage_records u WHERE id = $1", int(entity)
            )
            after = await self._post_debit(conn, int(entity), -amount, key, actor, corr)
        elif kind == "credit_payment":
            before = await conn.fetchval(
                "SELECT to_jsonb(p) FROM billing.payment_sessions p WHERE id = $1", entity
            )
            entry = await conn.fetchval(
                """INSERT INTO billing.ledger_entries (org_id, requested_by_user_id, kind, amount_minor,
                       payment_session_id, idempotency_key, actor, correlation_id)
                   SELECT p.org_id, p.user_id, 'payment_credit', p.amount_minor, p.id, $3, $4, $5
                   FROM billing.payment_sessions p
                   WHERE p.id = $1 AND p.amount_minor = $2 AND p.ledger_entry_id IS NULL
                     AND p.status IN ('failed_reconcile', 'completed')
                     AND NOT EXISTS (SELECT 1 FROM billing.ledger_entries l
                                     WHERE l.payment_session_id = p.id AND l.kind = 'payment_credit')
                   ON CONFLICT DO NOTHING RETURNING id""",
                entity,
                amount,
                key,
                actor,
                corr,
            )
            if entry is not None:
                after = await conn.fetchval(
                    """UPDATE billing.payment_sessions SET ledger_entry_id = $2, status = 'completed',
                           completed_at = coalesce(completed_at, now()) WHERE id = $1 RETURNING to_jsonb(payment_sessions.*)""",
                    entity,
                    entry,
                )
        elif kind == "link_payment_credit":
            before = await conn.fetchval(
                "SELECT to_jsonb(p) FROM billing.payment_sessions p WHERE id = $1", entity
            )
            after = await conn.fetchval(
                """UPDATE billing.payment_sessions p SET ledger_entry_id = l.id, status = 'completed',
                       completed_at = coalesce(p.completed_at, now())
                   FROM billing.ledger_entries l
                   WHERE p.id = $1 AND p.ledger_entry_id IS NULL AND l.payment_session_id = p.id
                     AND l.kind = 'payment_credit' RETURNING to_jsonb(p.*)""",
                entity,
            )
        else:
            raise bad_input(f"plan {request.plan_id!r} action {action['seq']}: unknown kind {kind!r}")
        await conn.execute(
            """INSERT INTO remediation.applied_actions (plan_id, seq, idempotency_key, kind, outcome, actor, approvers,
                   workflow_id, correlation_id, before, after)
               VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11) ON CONFLICT (plan_id, seq) DO NOTHING""",
            request.plan_id,
            action["seq"],
            key,
            kind,
            "applied" if after is not None else "skipped_stale",
            request.actor,
            request.approvers,
            request.ref.workflow_id,
            corr,
            before if isinstance(before, str) else json.dumps(before),
            after if isinstance(after, str) else json.dumps(after),
        )

    @staticmethod
    async def _post_debit(
        conn: asyncpg.Connection, usage_id: int, cost: int, key: str, actor: str, corr: str
    ) -> Any:
        return await conn.fetchval(
            """INSERT INTO billing.ledger_entries (org_id, requested_by_user_id, kind, amount_minor, usage_record_id,
                   idempotency_key, actor, correlation_id)
               SELECT u.org_id, u.requested_by_user_id, 'usage_debit', -u.accrued_cost_minor, u.id, $3, $4, $5
               FROM billing.usage_records u
               WHERE u.id = $1 AND u.end_time IS NOT NULL AND u.accrued_cost_minor = $2
                 AND NOT EXISTS (SELECT 1 FROM billing.ledger_entries l
                                 WHERE l.usage_record_id = u.id AND l.kind = 'usage_debit')
               ON CONFLICT DO NOTHING RETURNING to_jsonb(billing.ledger_entries.*)""",
            usage_id,
            cost,
            key,
            actor,
            corr,
        )

    # ------------------------------------------------------------------ verification

    @activity.defn(name=names.CHECK_DUPLICATES)
    async def check_duplicates(self, request: VerificationRequest) -> Criterion:
        """No usage record debited twice, no payment credited twice, no allocation metered twice."""
        ledger_pred, params = scope_predicate(request.ref.scope, LEDGER_COLUMNS, 1)
        usage_pred, uparams = scope_predicate(request.ref.scope, USAGE_COLUMNS, 1)
        debits = await self._fetchval(
            f"""SELECT count(*) FROM (SELECT usage_record_id FROM billing.ledger_entries l
                WHERE kind = 'usage_debit' AND {ledger_pred} GROUP BY 1 HAVING count(*) > 1) d""",
            *params,
        )
        credits = await self._fetchval(
            f"""SELECT count(*) FROM (SELECT payment_session_id FROM billing.ledger_entries l
                WHERE kind = 'payment_credit' AND {ledger_pred} GROUP BY 1 HAVING count(*) > 1) d""",
            *params,
        )
        open_twice = await self._fetchval(
            f"""SELECT count(*) FROM (SELECT allocation_id FROM billing.usage_records u
                WHERE end_time IS NULL AND {usage_pred} GROUP BY 1 HAVING count(*) > 1) d""",
            *uparams,
        )
        total = int(debits) + int(credits) + int(open_twice)
        return Criterion(
            name="no_duplicate_debits_or_credits",
            passed=total == 0,
            detail=f"duplicate debits {debits}, duplicate credits {credits}, double-open usage {open_twice}",
        )

    # ------------------------------------------------------------------ helpers

    async def _count_drift(self, scope: Scope) -> int:
        total = 0
        for check in _checks(scope, 1).values():
            total += int(await self._fetchval(f"SELECT count(*) FROM ({check.candidates}) q", *check.params))
        return total

    async def _diagnosis(self, ref: RunRef, check: str, status: str, data: dict[str, Any]) -> None:
        await self._execute(
            """INSERT INTO remediation.diagnoses (run_id, check_name, status, data) VALUES ($1, $2, $3, $4)
               ON CONFLICT (run_id, check_name) DO UPDATE SET status = excluded.status, data = excluded.data,
               at = now()""",
            ref.run_id,
            check,
            status,
            json.dumps(data, default=str),
        )

    async def _timeline(
        self, run_id: str, key: str, phase: str, message: str, detail: dict[str, Any]
    ) -> None:
        await self._execute(
            """INSERT INTO remediation.timeline (run_id, phase, actor, message, detail, event_key)
               VALUES ($1, $2, 'remediation-worker', $3, $4, $5) ON CONFLICT (event_key) DO NOTHING""",
            run_id,
            phase,
            message,
            json.dumps(detail, default=str),
            f"{run_id}:{key}",
        )

    async def _execute(self, sql: str, *args: Any) -> str:
        try:
            return str(await self._pool.execute(sql, *args))
        except TRANSIENT as exc:
            raise dependency_down(f"Postgres unavailable: {type(exc).__name__}") from exc

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            return list(await self._pool.fetch(sql, *args))
        except TRANSIENT as exc:
            raise dependency_down(f"Postgres unavailable: {type(exc).__name__}") from exc

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record:
        try:
            return await self._pool.fetchrow(sql, *args)
        except TRANSIENT as exc:
            raise dependency_down(f"Postgres unavailable: {type(exc).__name__}") from exc

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        try:
            return await self._pool.fetchval(sql, *args)
        except TRANSIENT as exc:
            raise dependency_down(f"Postgres unavailable: {type(exc).__name__}") from exc
