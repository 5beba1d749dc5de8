"""The runbook as one durable workflow: diagnose, freeze, reconcile, approve, remediate, verify, evidence.

Orchestration only: no I/O, no clocks, no randomness. Activities are called by method reference (their
stable names, in ``contracts.names``, are what history records).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from functools import partial
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.billing_api import BillingApiActivities
    from activities.postgres import BillingDatabaseActivities
    from activities.postgres.records import RecordsActivities
    from activities.runtime_config import ConfigActivities
    from contracts import names
    from contracts.models import (
        AlertNotice,
        ApplySummary,
        BlastRadius,
        EvidenceRequest,
        FinishRun,
        FreezeRequest,
        Phase,
        PlanBalancesRequest,
        PlanRequest,
        PlanSummary,
        RegisterRun,
        RemediationRequest,
        RemediationResult,
        RunRef,
        SnapshotRequest,
        StatusView,
    )
    from workflows.activity_calls import activity_options
    from workflows.criteria import consistency_after_reconcile
    from workflows.details import STEPS_MARKDOWN
    from workflows.incident_marks import incident_marks
    from workflows.remediation_diagnosis import DiagnosisSteps

# Expected failures that retrying cannot fix; everything else retries with backoff up to the limit.
MAX_PASSES = 3
# Runs started after this loaded their options and registered at once (older histories replay in turn).
OVERLAPPED_START_PATCH = "overlapped-start"
# Runs started after this take the before-evidence once the plan is built, not beside it: on two cores
# its platform-wide sums took CPU from the plan (it is awaited before anything changes either way).
SNAPSHOT_AFTER_PLAN_PATCH = "snapshot-after-plan"
# Runs started after this read the balances of all but the plan's first customers beside the before-
# evidence, while the plan waits for approval (a platform-wide plan's balances sum most of the ledger).
BALANCES_LATER_PATCH = "balances-beside-approval"
MAX_ALERTS = 50  # distinct alerts recorded per run; history stays bounded under alert storms


async def _all_of(*steps: Awaitable[Any]) -> None:
    """Await every step (one task for the workflow to await)."""
    await asyncio.gather(*steps)


@workflow.defn(name=names.WORKFLOW)
class BillingRemediationWorkflow(DiagnosisSteps):
    """One remediation of one scope, from diagnosis to evidence (state and helpers: ``RemediationBase``)."""

    # ---------------------------------------------------------------- run

    @workflow.run
    async def run(self, request: RemediationRequest) -> RemediationResult:
        """Run the runbook for ``request``; see the module docstring."""
        info = workflow.info()
        self._ref = RunRef(
            run_id=info.run_id,
            workflow_id=info.workflow_id,
            correlation_id=request.correlation_id,
            trace_id=request.trace_id,
            scope=request.scope,
        )
        self._upsert_scope_attributes()
        # Issues no command until an audit is queued.
        self._auditor = asyncio.create_task(self._audit_approvals())
        load = workflow.execute_activity_method(
            ConfigActivities.load_runtime_options,
            **activity_options(
                None,
                timeout=None,
                heartbeat=False,
                attempts=5,
                summary="Load the approval policy and thresholds",
            ),
        )
        register = self._act(
            RecordsActivities.register_run,
            RegisterRun(ref=self._ref, request=request),
            f"Register remediation of {request.scope.describe()} by {request.requested_by}",
            attempts=3,
        )
        if workflow.patched(OVERLAPPED_START_PATCH):
            # Registering needs no option: both at once, one round trip fewer before the diagnosis; the
            # provider's slow lookups start beside them.
            if request.reverses is None:
                self._start_provider_prefetch()
            self._options, _ = await asyncio.gather(load, register)
        else:
            self._options = await load
            await register
        outcome = Phase.FAILED
        plan: PlanSummary | None = None
        applied: ApplySummary | None = None
        try:
            outcome, plan, applied = await self._remediate(request)
            result = RemediationResult(
                workflow_id=info.workflow_id,
                run_id=info.run_id,
                outcome=outcome,
                blast_radius=self._blast,
                plan=plan,
                applied=applied,
                verification=self._verification,
                approvers=list(self._approval.approved_by),
            )
        except GeneratorExit:
            # Not an ending: Python closing this coroutine after the worker dropped the run (garbage
            # collection), possibly while another run's code executes in this thread. Cleaning up here
            # issued that run's first cleanup command (an approver page) inside the other one: a
            # nondeterminism error there. A `finally` cannot tell this apart, hence the clauses below.
            raise
        except BaseException as err:
            # Failure and cancellation alike: the freeze is always lifted.
            if isinstance(err, asyncio.CancelledError):
                outcome = Phase.CANCELLED
            await self._cleanup(outcome, plan)
            raise
        await self._cleanup(outcome, plan)
        # The last status travels with the result: `remediate status` of an ended run reads it instead
        # of a query, which replays the whole history on a worker (about 55 ms a call here).
        return result.model_copy(update={"status": self.status()})

    async def _remediate(
        self, request: RemediationRequest
    ) -> tuple[Phase, PlanSummary | None, ApplySummary | None]:
        if request.reverses is not None:
            return await self._reverse(request)
        ref = self._require_ref()
        options = self._require_options()
        await self._diagnose(request, options)

        if self._blast is BlastRadius.WIDESPREAD and request.dry_run:
            # A dry run touches nothing on the platform: it says what a real run would do.
            await self._timeline(
                "dry run: a real run would freeze manual adjustments here (widespread drift); nothing frozen",
                request.requested_by,
                "",
            )
        elif self._blast is BlastRadius.WIDESPREAD:
            self._set_phase(Phase.FREEZING)
            self._frozen_id = f"{ref.workflow_id}/{ref.run_id}"
            await self._act(
                BillingApiActivities.freeze_adjustments,
                FreezeRequest(
                    ref=ref,
                    freeze_id=self._frozen_id,
                    actor=request.requested_by,
                    reason=f"widespread billing drift; remediation {ref.workflow_id}",
                ),
                f"Freeze manual adjustments for {request.scope.describe()}",
            )

        worker_degraded = any(
            c.check == "nats_consumer" and c.status in ("critical", "warn") for c in self._diagnosis
        )
        applied: ApplySummary | None = None
        plan: PlanSummary | None = None
        for pass_no in range(MAX_PASSES):
            self._set_phase(Phase.RECONCILING)
            summary = await self._reconcile_and_confirm(pass_no, request.scope.describe())
            self._drift = dict(summary.counts)
            if pass_no == 0:
                await self._diagnosed()  # the plan and the consistency verdict wait for every check
                self._diagnosis = [consistency_after_reconcile(c, self._drift) for c in self._diagnosis]
            # Nothing changes before approval: the before-evidence is taken while the plan waits for it,
            # off the path to the plan (a platform-wide snapshot sums every usage and ledger row).
            after_plan = pass_no == 0 and workflow.patched(SNAPSHOT_AFTER_PLAN_PATCH)
            if pass_no == 0 and not after_plan:
                self._take_before()
            balances_later = after_plan and workflow.patched(BALANCES_LATER_PATCH)
            rollback_to = self._rollback_target()
            plan = await self._act(
                BillingDatabaseActivities.build_plan,
                PlanRequest(
                    ref=ref,
                    pass_no=pass_no,
                    plan_id=f"{ref.run_id}-p{pass_no}",
                    # The worker is platform-wide: only a platform-wide run restarts it; a scoped run
                    # names the degradation (platform_degradation) instead.
                    restart_worker=worker_degraded and pass_no == 0 and request.scope.is_global,
                    rollback_worker_to=rollback_to,
                    rollback_worker_from=self._rollback_source() if rollback_to is not None else None,
                    # Empty on runs whose options predate signed hooks: the plan then names none.
                    worker_hook=(options.restart_hook if rollback_to is None else options.rollback_hook)
                    or None,
                    balances_later=balances_later,
                ),
                "Build the remediation plan from the findings",
                timeout=600,
                heartbeat=True,
                attempts=20,
            )
            if after_plan:
                self._take_before(plan.plan_id if balances_later else None)
            ended, applied = await self._approve_apply_verify(
                request, plan, applied, partial(self._verify, request, pass_no)
            )
            if ended is not None:
                return ended, plan, applied
        return Phase.HANDED_OFF, plan, applied

    # ---------------------------------------------------------------- steps

    def _take_before(self, balances_of: str | None = None) -> None:
        """Start capturing the before-evidence (awaited before anything changes): the scope's query evidence
        and, for a plan that left them to read, its other customers' balances."""
        ref = self._require_ref()
        snapshot = self._act(
            RecordsActivities.snapshot_scope,
            SnapshotRequest(ref=ref, label="before"),
            "Capture before-remediation query evidence",
        )
        if balances_of is None:  # the task exactly as recorded before balances moved here (replay)
            self._before = asyncio.create_task(snapshot)
            return
        balances = self._act(
            BillingDatabaseActivities.read_plan_balances,
            PlanBalancesRequest(ref=ref, plan_id=balances_of),
            f"Read the balances of plan {balances_of}'s other customers",
            timeout=600,
            heartbeat=True,
            attempts=20,
        )
        self._before = asyncio.create_task(_all_of(snapshot, balances))

    async def _cleanup(self, outcome: Phase, plan: PlanSummary | None) -> None:
        ref = self._require_ref()
        # A run that ended while its plan waited (cancelled, failed): its pages end with it.
        await self._resolve_pages(self._approval.plan)
        if self._frozen_id is not None:
            await self._act(
                BillingApiActivities.unfreeze_adjustments,
                FreezeRequest(
                    ref=ref,
                    freeze_id=self._frozen_id,
                    actor=self._request.requested_by,
                    reason=f"remediation ended: {outcome.value}",
                ),
                "Lift the manual-adjustment freeze",
                attempts=20,
            )
            self._frozen_id = None
        self._set_phase(Phase.CAPTURING_EVIDENCE)
        if self._prefetch is not None and not self._prefetch.done():
            # A run that ended before its plan needs no more answers from the provider.
            self._prefetch.cancel()
        for pending in (self._before, self._prefetch, self._diagnosis_rest):
            if pending is not None and not pending.done():
                with contextlib.suppress(ActivityError, asyncio.CancelledError):
                    await pending
        await workflow.wait_condition(lambda: not self._audits and not self._auditing)
        await self._act(
            RecordsActivities.capture_evidence,
            EvidenceRequest(
                ref=ref,
                outcome=outcome.value,
                blast_radius=self._blast.value if self._blast else None,
                plan_id=plan.plan_id if plan else None,
                verification=self._verification,
                approvers=list(self._approval.approved_by),
                marks=incident_marks(self._diagnosis, list(self._alerts.values())),
                diagnosis=self._diagnosis,
            ),
            "Capture the evidence pack",
        )
        await self._act(
            RecordsActivities.finish_run,
            FinishRun(
                ref=ref,
                phase=outcome.value,
                outcome=outcome.value,
                blast_radius=self._blast.value if self._blast else None,
            ),
            f"Close the run as {outcome.value}",
        )
        self._set_phase(outcome)
        await workflow.wait_condition(workflow.all_handlers_finished)

    # ---------------------------------------------------------------- handlers
    @workflow.signal(name=names.SIGNAL_ALERT)
    def alert(self, notice: AlertNotice) -> None:
        """Record an alert about this scope (repeats of one alert and status are kept once).

        A resolved alert is recorded, not obeyed: a quiet alert does not prove the billing data is whole.
        """
        if notice.key() in self._alerts or len(self._alerts) >= MAX_ALERTS:
            return
        self._alerts[notice.key()] = notice
        self._refresh_details()

    @workflow.query(name=names.QUERY_STATUS)
    def status(self) -> StatusView:
        """Phase, diagnosis, drift, plan, approvals and verdict."""
        return StatusView(
            phase=self._phase,
            blast_radius=self._blast,
            diagnosis=self._diagnosis,
            drift=self._drift,
            plan=self._approval.plan,
            approvals=list(self._approval.approved_by),
            approvals_needed=self._approvals_needed(),
            rejected_by=self._approval.rejected_by,
            verification=self._verification,
            frozen=self._frozen_id is not None,
            alerts=list(self._alerts.values()),
            payments=self._payments,
            waiting_on_provider=self._waiting,
            stalled=self._stalled,
        )

    @workflow.query(name=names.QUERY_PLAN)
    def plan(self) -> PlanSummary | None:
        """The current plan (its actions are in Postgres: `remediate plan ID`)."""
        return self._approval.plan

    # ---------------------------------------------------------------- helpers


__all__ = ["STEPS_MARKDOWN", "BillingRemediationWorkflow"]
