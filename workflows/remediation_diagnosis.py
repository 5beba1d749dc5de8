"""The runbook's diagnosis: seven checks at once, the Tempo trace Loki names, and the blast radius.

Orchestration only (see ``workflows.remediation``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.loki import LokiActivities
    from activities.nats_jetstream import NatsActivities
    from activities.postgres import BillingDatabaseActivities
    from activities.tempo import TempoActivities
    from activities.worker_regression import WorkerRegressionActivities
    from contracts.models import (
        BlastRadius,
        BlastRadiusRequest,
        BlastRadiusResult,
        CheckResult,
        Phase,
        RemediationRequest,
        RunRef,
        RuntimeOptions,
    )
    from workflows.activity_calls import activity_cause
    from workflows.remediation_reversal import ReversalSteps
    from workflows.search_attributes import SA_BLAST

# Runs started after this assess the blast radius as soon as the consumer check answers, beside the rest.
BLAST_BESIDE_DIAGNOSIS_PATCH = "blast-beside-diagnosis"
# Runs started after this reconcile once the consumer, the outbox relay and the blast radius are known; the
# slower checks (data consistency, Loki, the event sequence, the worker's rollout) finish beside it.
RECONCILE_BESIDE_DIAGNOSIS_PATCH = "reconcile-beside-diagnosis"


class DiagnosisSteps(ReversalSteps):
    """Diagnosis: the checks, the trace and the blast radius."""

    async def _diagnose(self, request: RemediationRequest, options: RuntimeOptions) -> None:
        ref = self._require_ref()
        self._set_phase(Phase.DIAGNOSING)
        scope_words = request.scope.describe()
        # Seven checks at once; the blast radius needs only the consumer's, so it starts once that
        # answers (runs started before this assess it after all seven).
        started = [
            asyncio.create_task(check)
            for check in (
                self._check(
                    BillingDatabaseActivities.check_postgres, "postgres", ref, "Check Postgres connectivity"
                ),
                self._check(
                    NatsActivities.check_consumer,
                    "nats_consumer",
                    ref,
                    "Check the billing worker's NATS consumer (pending, ack-pending, redeliveries)",
                ),
                self._check(
                    BillingDatabaseActivities.check_outbox,
                    "outbox_relay",
                    ref,
                    "Check outbox relay backlog and lag",
                ),
                self._check(
                    LokiActivities.query_correlation_logs,
                    "loki_logs",
                    ref,
                    f"Search Loki for correlation id {request.correlation_id}",
                ),
                self._check(
                    NatsActivities.read_event_sequence,
                    "event_sequence",
                    ref,
                    f"Validate the event sequence for {scope_words}",
                ),
                self._check(
                    WorkerRegressionActivities.check_worker_regression,
                    "worker_regression",
                    ref,
                    "Compare the billing worker's failures with its latest rollout",
                ),
                self._check(
                    BillingDatabaseActivities.check_data_consistency,
                    "data_consistency",
                    ref,
                    f"Check usage/ledger/allocation/attribution consistency for {scope_words}",
                ),
            )
        ]
        blast = (
            asyncio.create_task(self._blast_after(started[1], options))
            if workflow.patched(BLAST_BESIDE_DIAGNOSIS_PATCH)
            else None
        )
        if blast is not None and workflow.patched(RECONCILE_BESIDE_DIAGNOSIS_PATCH):
            # Reconciling needs the consumer's and the outbox relay's answers and the blast radius (freeze,
            # quorum); the other checks finish beside the reconciliation and the plan waits for them.
            self._diagnosis = [await started[1], await started[2]]
            assessed = await blast
            self._settle_blast(assessed)
            self._diagnosis_rest = asyncio.create_task(self._finish_diagnosis(request, started, assessed))
            return
        await self._gather_checks(request, started)
        if blast is not None:
            assessed = await blast
        else:
            degraded = any(c.check == "nats_consumer" and c.status == "critical" for c in self._diagnosis)
            assessed = await self._assess_blast(degraded, options)
        self._settle_blast(assessed)
        self._name_degradation(assessed)
        self._refresh_details()

    async def _diagnosed(self) -> None:
        """Every diagnosis check has answered (the plan and the consistency verdict wait for them)."""
        if self._diagnosis_rest is not None:
            await self._diagnosis_rest

    async def _finish_diagnosis(
        self,
        request: RemediationRequest,
        started: list[asyncio.Task[CheckResult]],
        assessed: BlastRadiusResult | None,
    ) -> None:
        await self._gather_checks(request, started)
        self._name_degradation(assessed)
        self._refresh_details()

    async def _gather_checks(
        self, request: RemediationRequest, started: list[asyncio.Task[CheckResult]]
    ) -> None:
        """The seven checks' answers in their order, then the Tempo trace Loki named (if any)."""
        ref = self._require_ref()
        checks = await asyncio.gather(*started)
        self._diagnosis = list(checks)
        trace_id = request.trace_id or next(
            (t for c in checks if c.check == "loki_logs" for t in c.trace_ids), None
        )
        if trace_id is not None:
            traced = ref.model_copy(update={"trace_id": trace_id})
            self._diagnosis.append(
                await self._check(
                    TempoActivities.summarize_trace,
                    "tempo_trace",
                    traced,
                    f"Summarize Tempo trace {trace_id}",
                )
            )

    def _settle_blast(self, assessed: BlastRadiusResult | None) -> None:
        """The run's blast radius, shown as a search attribute."""
        # Without the numbers, assume the worst: widespread means freeze and quorum.
        self._blast = BlastRadius.WIDESPREAD if assessed is None else assessed.radius
        workflow.upsert_search_attributes([SA_BLAST.value_set(self._blast.value)])

    def _name_degradation(self, assessed: BlastRadiusResult | None) -> None:
        # Named, not inherited: the run's freeze and quorum follow its own scope and plan.
        if assessed is not None and assessed.platform_degradation is not None:
            self._diagnosis.append(assessed.platform_degradation)

    async def _blast_after(
        self, consumer: asyncio.Task[CheckResult], options: RuntimeOptions
    ) -> BlastRadiusResult | None:
        """The blast radius, assessed as soon as the billing worker's consumer check has answered."""
        return await self._assess_blast((await consumer).status == "critical", options)

    async def _assess_blast(self, worker_degraded: bool, options: RuntimeOptions) -> BlastRadiusResult | None:
        """Single dispute, one org or widespread (None: the assessment failed)."""
        ref = self._require_ref()
        try:
            return await self._act(
                BillingDatabaseActivities.assess_blast_radius,
                BlastRadiusRequest(
                    ref=ref,
                    worker_degraded=worker_degraded,
                    widespread_org_threshold=options.widespread_org_threshold,
                ),
                f"Assess the blast radius around {ref.scope.describe()}",
            )
        except ActivityError:
            return None

    async def _check(
        self, activity: Callable[[Any, RunRef], Awaitable[CheckResult]], check: str, ref: RunRef, summary: str
    ) -> CheckResult:
        """Run one diagnosis activity; a dependency that is down becomes a finding, not a crash."""
        try:
            return await self._act(activity, ref, summary, attempts=3)
        except ActivityError as err:
            return CheckResult(
                check=check, status="unreachable", headline=f"{check} unreachable: {activity_cause(err)}"
            )
