"""Diagnosis on the billing data: Postgres, outbox, data consistency, blast radius, duplicates"""

from __future__ import annotations

import time

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from activities.postgres.base import TRANSIENT, PostgresActivities, driver_errors
from activities.postgres.consistency_sql import (
    INDEXED,
    SCANNING,
    consistency_counts,
    count_all,
    drift_by_org,
)
from activities.postgres.platform_summary import PlatformSummary, latest_platform_summary
from activities.scope_sql import LEDGER_COLUMNS, USAGE_COLUMNS, scope_predicate
from contracts import names
from contracts.models import (
    BlastRadius,
    BlastRadiusRequest,
    BlastRadiusResult,
    CheckResult,
    Criterion,
    RemediationRequest,
    RunRef,
    VerificationRequest,
)


class DiagnosisActivities(PostgresActivities):
    """Diagnosis on the billing data."""

    # Set by the worker: asked whether the platform-wide remediation runs (see _platform_degradation).
    _temporal: Client | None = None
    # How old a platform summary may be and still stand in for a platform scan (PLATFORM_SUMMARY_MAX_AGE_SECONDS).
    _summary_max_age_s: int = 900

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
        scope = ref.scope
        summary = None
        measured: tuple[str, ...] = INDEXED + SCANNING
        if scope.is_global:
            # The two full-platform joins come from the background summary when it is recent enough;
            # the indexed counts are always measured now.
            summary = await self._summary(with_consistency=True)
            if summary is not None:
                measured = INDEXED
        with driver_errors():
            counts = await count_all(self._pool, consistency_counts(scope, measured))
        if summary is not None and summary.consistency is not None:
            counts.update({name: int(summary.consistency.get(name, 0)) for name in SCANNING})
        counts = {name: counts[name] for name in INDEXED + SCANNING}
        problems = [f"{k}={v}" for k, v in counts.items() if v]
        status = "warn" if problems else "ok"
        headline = "consistent" if not problems else "inconsistent: " + ", ".join(problems)
        data: dict[str, object] = dict(counts)
        if summary is not None:
            # Say what the summary measured and when: it predates this run, and the platform may have
            # drifted since (the workflow re-states this check if its reconciliation finds drift).
            headline += (
                f" ({' and '.join(SCANNING)} from the platform summary measured at {summary.measured_at} UTC,"
                f" {summary.age_words()} before this check; the other counts measured now)"
            )
            data["platform_summary_age_s"] = summary.age_s
        await self._diagnosis(ref, "data_consistency", status, data)
        return CheckResult(check="data_consistency", status=status, headline=headline, counts=counts)

    @activity.defn(name=names.ASSESS_BLAST_RADIUS)
    async def assess_blast_radius(self, request: BlastRadiusRequest) -> BlastRadiusResult:
        """Single dispute, one org, or widespread: from drift in and around the scope and worker health.

        Drift around the scope is the platform summary's (recent enough, its age stated): a scoped run
        never scans the platform, and a platform-wide run counts its drift in the reconciliation next.
        """
        scope = request.ref.scope
        in_scope: int | None = None
        if not scope.is_global:
            with driver_errors():
                by_kind, _ = await drift_by_org(self._pool, scope)
            in_scope = sum(by_kind.values())
        summary = await self._summary()
        orgs = None if summary is None else summary.orgs_with_drift
        # Platform-wide signals widen only a platform-wide run. A user's dispute or one org's drift keeps
        # its own risk (freeze and quorum follow its scope and plan); the wider degradation becomes a
        # named finding that points to the remediation handling it, or says none is running.
        wider: list[str] = []
        if request.worker_degraded:
            wider.append("billing worker consumer is critical (global degradation)")
        if summary is not None and summary.orgs_with_drift >= request.widespread_org_threshold:
            wider.append(
                f"drift in {summary.orgs_with_drift} orgs (threshold {request.widespread_org_threshold};"
                f" platform summary of {summary.age_words()} ago)"
            )
        unmeasured = (
            f"platform-wide drift not measured in the last {self._summary_max_age_s // 60} min"
            " (a scoped run does not scan the platform; the worker refreshes the summary)"
        )
        platform: CheckResult | None = None
        if scope.is_global:
            radius = BlastRadius.WIDESPREAD
            reasons = ["scope is the whole platform", *wider]
        else:
            if scope.org_id and not (scope.project_id or scope.user_id or scope.allocation_id):
                radius, reasons = BlastRadius.ORG, ["confined to one org"]
            else:
                radius, reasons = BlastRadius.SINGLE, ["confined to a single user/project"]
            if summary is None:
                reasons.append(unmeasured)
            if wider:
                platform = await self._platform_degradation(request.ref, wider)
        await self._diagnosis(
            request.ref,
            "blast_radius",
            radius.value,
            {
                "drift_in_scope": in_scope,
                "orgs_with_drift": orgs,
                "platform_summary_age_s": None if summary is None else summary.age_s,
                "reasons": reasons,
            },
        )
        return BlastRadiusResult(
            radius=radius,
            drift_in_scope=in_scope,
            orgs_with_drift=orgs,
            platform_summary_age_s=None if summary is None else summary.age_s,
            reasons=reasons,
            platform_degradation=platform,
        )

    async def _summary(self, *, with_consistency: bool = False) -> PlatformSummary | None:
        with driver_errors():
            return await latest_platform_summary(
                self._pool, self._summary_max_age_s, with_consistency=with_consistency
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
                WHERE kind = 'usage_debit' AND reversed_by_entry_id IS NULL AND {ledger_pred} GROUP BY 1 HAVING count(*) > 1) d""",
            *params,
        )
        credits = await self._fetchval(
            f"""SELECT count(*) FROM (SELECT payment_session_id FROM billing.ledger_entries l
                WHERE kind = 'payment_credit' AND reversed_by_entry_id IS NULL AND {ledger_pred} GROUP BY 1 HAVING count(*) > 1) d""",
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
