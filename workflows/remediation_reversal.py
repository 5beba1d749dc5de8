"""A reversal as runbook steps: plan the exact inverse of a run, approve, apply, verify, evidence.

Orchestration only. The plan comes from the original run's audit rows (``build_reversal_plan``); approval,
apply, audit chain and crash-safety are the forward plan's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.postgres import BillingDatabaseActivities
    from activities.postgres.records import RecordsActivities
    from contracts.models import (
        LEFT_NAMED,
        ApplyRequest,
        ApplySummary,
        BlastRadius,
        Phase,
        PlanSummary,
        ReconcileRequest,
        RemediationRequest,
        ReversalPlanRequest,
        ReversalVerifyRequest,
        SnapshotRequest,
        VerificationRequest,
        VerificationResult,
    )
    from workflows.activity_calls import activity_cause
    from workflows.approval import reset_for_plan
    from workflows.remediation_verify import VerifySteps

MAX_REVERSAL_PASSES = 3


class ReversalSteps(VerifySteps):
    """Apply (shared by forward and reversal plans) and the reversal's own steps."""

    async def _reverse(
        self, request: RemediationRequest
    ) -> tuple[Phase, PlanSummary | None, ApplySummary | None]:
        """Take back what ``request.reverses`` applied (within the request's scope), after approval."""
        ref = self._require_ref()
        target = request.reverses
        if target is None:  # unreachable: the caller checks
            raise ValueError("not a reversal")
        # Taking back a platform-wide run is as risky as the run was: quorum, whatever the money.
        self._blast = BlastRadius.WIDESPREAD if request.scope.is_global else None
        plan: PlanSummary | None = None
        applied: ApplySummary | None = None
        for pass_no in range(MAX_REVERSAL_PASSES):
            self._set_phase(Phase.RECONCILING)
            plan = await self._act(
                BillingDatabaseActivities.build_reversal_plan,
                ReversalPlanRequest(ref=ref, plan_id=f"{ref.run_id}-p{pass_no}", target=target),
                f"Plan the exact inverse of run {target.run_id} ({target.workflow_id}) for"
                f" {request.scope.describe()}",
                timeout=600,
                heartbeat=True,
                attempts=20,
            )
            if pass_no == 0:
                self._before = asyncio.create_task(
                    self._act(
                        RecordsActivities.snapshot_scope,
                        SnapshotRequest(ref=ref, label="before"),
                        "Capture before-reversal query evidence",
                    )
                )
            ended, applied = await self._approve_apply_verify(
                request, plan, applied, partial(self._verify_reversal, request, plan, pass_no)
            )
            if ended is not None:
                return ended, plan, applied
        return Phase.HANDED_OFF, plan, applied

    async def _verify_reversal(
        self, request: RemediationRequest, plan: PlanSummary, pass_no: int
    ) -> VerificationResult:
        """Each entry reversed exactly once, each row restored or named; no duplicates; drift re-measured."""
        ref = self._require_ref()
        self._set_phase(Phase.VERIFYING)
        complete = await self._act(
            BillingDatabaseActivities.verify_reversal,
            ReversalVerifyRequest(ref=ref, plan_id=plan.plan_id),
            "Check every planned entry is reversed exactly once and every row restored",
        )
        duplicates = await self._act(
            BillingDatabaseActivities.check_duplicates,
            VerificationRequest(ref=ref, pass_no=pass_no),
            "Check for duplicate debits and credits",
        )
        # Not a criterion: after a full reversal the drift is what it was before the original run.
        drift = await self._act(
            BillingDatabaseActivities.reconcile,
            ReconcileRequest(ref=ref, pass_no=100 + pass_no, name_left=LEFT_NAMED),
            f"Re-run reconciliation for {request.scope.describe()} (the drift the reversal leaves)",
            timeout=600,
            heartbeat=True,
        )
        self._drift = dict(drift.counts)
        self._verification = VerificationResult(
            passed=complete.passed and duplicates.passed, criteria=[complete, duplicates]
        )
        await self._act(
            RecordsActivities.snapshot_scope,
            SnapshotRequest(ref=ref, label="after", pass_no=100 + pass_no),
            "Capture after-reversal query evidence",
        )
        self._refresh_details()
        return self._verification

    async def _approve_apply_verify(
        self,
        request: RemediationRequest,
        plan: PlanSummary,
        applied: ApplySummary | None,
        verify: Callable[[], Awaitable[VerificationResult]],
    ) -> tuple[Phase | None, ApplySummary | None]:
        """A pass after its plan (forward or reversal): approval, apply, verification, a human's decision.

        Returns the phase the run ends in (None: plan again) and the apply's summary.
        """
        reset_for_plan(self._approval, plan, workflow.now())
        self._refresh_details()
        if request.dry_run:
            await self._before_taken()
            return Phase.DRY_RUN_COMPLETE, None
        if not plan.empty:
            decided = await self._await_approval(plan)
            if decided is not None:
                return decided, applied
            await self._before_taken()
            try:
                applied = await self._apply(plan)
            except ActivityError as err:
                # Retries exhausted (a dependency down for long): stop and ask a human instead of
                # failing half-way. A retry plans again, so committed batches are not redone.
                self._stalled = f"apply stopped: {activity_cause(err)}"
                if await self._await_verdict_decision() == "hand_off":
                    return Phase.HANDED_OFF, applied
                return None, applied
        verdict = await verify()
        if verdict.passed:
            return Phase.COMPLETED, applied
        if await self._await_verdict_decision() == "hand_off":
            return Phase.HANDED_OFF, applied
        return None, applied

    async def _apply(self, plan: PlanSummary) -> ApplySummary:
        ref = self._require_ref()
        options = self._require_options()
        approvers = list(self._approval.approved_by)
        applied: ApplySummary = await self._act(
            BillingDatabaseActivities.apply_plan,
            ApplyRequest(
                ref=ref,
                plan_id=plan.plan_id,
                plan_hash=plan.plan_hash,
                actor=self._request.requested_by,
                approvers=approvers,
                batch_size=options.apply_batch_size,
            ),
            f"Apply {plan.action_count} approved actions of plan {plan.plan_id} in batches",
            timeout=3600,
            heartbeat=True,
            attempts=50,
        )
        await self._api_actions(plan, approvers)
        self._refresh_details()
        return applied

    async def _before_taken(self) -> None:
        """The before-evidence is complete (it must be, before anything changes or the evidence is built)."""
        if self._before is not None:
            await self._before
