"""Diagnosis on the billing data: Postgres, outbox, data consistency, blast radius, duplicates"""

from __future__ import annotations

import time

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from activities.postgres.base import TRANSIENT, PostgresActivities
from activities.postgres.drift_sql import checks
from activities.scope_sql import ALLOCATION_COLUMNS, LEDGER_COLUMNS, USAGE_COLUMNS, scope_predicate
from contracts import names
from contracts.models import (
    BlastRadius,
    BlastRadiusRequest,
    BlastRadiusResult,
    CheckResult,
    Criterion,
    RemediationRequest,
    RunRef,
    Scope,
    VerificationRequest,
)


class DiagnosisActivities(PostgresActivities):
    """Diagnosis on the billing data."""

    # Set by the worker: asked whether the platform-wide remediation runs (see _platform_degradation).
    _temporal: Client | None = None

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
        """The degradation outside this run's scope, and the platform-wide remediation handling it, if any.

        Whether that remediation runs is Temporal's answer, not the runs table's: a run terminated from
        outside never writes its end, and pointing a commander at it would send them nowhere.
        """
        global_id = RemediationRequest(correlation_id="x", requested_by="x").workflow_id()
        run_id, handled = await self._global_remediation(global_id)
        headline = f"outside this run's scope: {'; '.join(wider)}; {handled}"
        data = {"signals": wider, "global_workflow_id": global_id, "global_run_id": run_id}
        await self._diagnosis(ref, "platform_degradation", "warn", data)
        return CheckResult(check="platform_degradation", status="warn", headline=headline)

    async def _global_remediation(self, global_id: str) -> tuple[str | None, str]:
        """The running platform-wide remediation's run id (or None) and a sentence a commander acts on."""
        none_running = (
            "no platform-wide remediation is running: start one with `remediate start "
            "--correlation-id <incident> --trigger worker_failure`"
        )
        if self._temporal is None:
            return None, "whether a platform-wide remediation runs is unknown (no Temporal client here)"
        try:
            description = await self._temporal.get_workflow_handle(global_id).describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return None, none_running
            return None, f"whether {global_id} runs is unknown (Temporal: {err.message[:120]})"
        if description.status != WorkflowExecutionStatus.RUNNING:
            return None, none_running
        started = await self._fetchrow(
            "SELECT requested_by, correlation_id FROM remediation.runs WHERE run_id = $1", description.run_id
        )
        who = (
            f", correlation {started['correlation_id']}, started by {started['requested_by']}"
            if started
            else ""
        )
        return description.run_id, f"{global_id} is running (run {description.run_id}{who})"

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

    async def _count_drift(self, scope: Scope) -> int:
        total = 0
        for check in checks(scope, 1).values():
            total += int(await self._fetchval(f"SELECT count(*) FROM ({check.candidates}) q", *check.params))
        return total
