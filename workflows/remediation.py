"""The runbook as one durable workflow: diagnose, freeze, reconcile, approve, remediate, verify, evidence.

Orchestration only: no I/O, no clocks, no randomness. Activities are referenced by their stable names.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

    from workflows import names
    from workflows.activity_calls import activity_cause, activity_options
    from workflows.approval import (
        ApprovalState,
        apply_decision,
        approvals_required,
        refusal,
        reset_for_plan,
    )
    from workflows.criteria import worker_criterion
    from workflows.details import STEPS_MARKDOWN, details_markdown
    from workflows.launch_guard import LaunchGuardWorkflow
    from workflows.models import (
        AlertNotice,
        ApiActionAudit,
        ApiActionRequest,
        ApiActionResult,
        ApplyRequest,
        ApplySummary,
        ApprovalDecision,
        ApprovalRecord,
        BlastRadius,
        BlastRadiusRequest,
        BlastRadiusResult,
        CheckResult,
        ConsumerSample,
        Criterion,
        EscalationRequest,
        EvidenceRequest,
        FinishRun,
        FreezeRequest,
        LaunchGuardVerifyRequest,
        Phase,
        PlanRequest,
        PlanSummary,
        ReconcileRequest,
        ReconcileSummary,
        RegisterRun,
        RemediationRequest,
        RemediationResult,
        RunRef,
        RuntimeOptions,
        SnapshotRequest,
        StatusView,
        TimelineEvent,
        Trigger,
        VerdictDecision,
        VerificationRequest,
        VerificationResult,
    )
    from workflows.search_attributes import SA_APPROVAL, SA_BLAST, SA_PHASE, scope_values

R = TypeVar("R", bound=BaseModel)


# Expected failures that retrying cannot fix; everything else retries with backoff up to the limit.
MAX_PASSES = 3
MAX_ALERTS = 50  # distinct alerts recorded per run; history stays bounded under alert storms


@workflow.defn(name=names.WORKFLOW)
class BillingRemediationWorkflow:
    """One remediation of one scope, from diagnosis to evidence."""

    @workflow.init
    def __init__(self, request: RemediationRequest) -> None:
        self._request = request
        self._phase = Phase.STARTED
        self._blast: BlastRadius | None = None
        self._diagnosis: list[CheckResult] = []
        self._drift: dict[str, int] = {}
        self._approval = ApprovalState()
        self._awaiting_approval = False
        self._options: RuntimeOptions | None = None
        self._verification: VerificationResult | None = None
        self._verdict: VerdictDecision | None = None
        self._frozen_id: str | None = None
        self._stalled: str | None = None
        self._ref: RunRef | None = None
        self._events = 0
        self._alerts: dict[str, AlertNotice] = {}
        # Approval audits waiting for the auditor coroutine (handlers never await activities).
        self._audits: list[tuple[ApprovalDecision, str | None, str]] = []
        self._auditing = False

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
        self._options = await self._act(
            names.LOAD_RUNTIME_OPTIONS, None, RuntimeOptions, "Load the approval policy and thresholds"
        )
        await self._act(
            names.REGISTER_RUN,
            RegisterRun(ref=self._ref, request=request),
            None,
            f"Register remediation of {request.scope.describe()} by {request.requested_by}",
            attempts=3,
        )
        outcome = Phase.FAILED
        plan: PlanSummary | None = None
        applied: ApplySummary | None = None
        try:
            outcome, plan, applied = await self._remediate(request)
            return RemediationResult(
                workflow_id=info.workflow_id,
                run_id=info.run_id,
                outcome=outcome,
                blast_radius=self._blast,
                plan=plan,
                applied=applied,
                verification=self._verification,
                approvers=list(self._approval.approved_by),
            )
        except asyncio.CancelledError:
            outcome = Phase.CANCELLED
            raise
        finally:
            # Runs on success, failure and cancellation alike: the freeze is always lifted.
            await self._cleanup(outcome, plan)

    async def _remediate(
        self, request: RemediationRequest
    ) -> tuple[Phase, PlanSummary | None, ApplySummary | None]:
        ref = self._require_ref()
        options = self._require_options()
        await self._diagnose(request, options)

        if self._blast is BlastRadius.WIDESPREAD:
            self._set_phase(Phase.FREEZING)
            self._frozen_id = f"{ref.workflow_id}/{ref.run_id}"
            await self._act(
                names.FREEZE_ADJUSTMENTS,
                FreezeRequest(
                    ref=ref,
                    freeze_id=self._frozen_id,
                    actor=request.requested_by,
                    reason=f"widespread billing drift; remediation {ref.workflow_id}",
                ),
                None,
                f"Freeze manual adjustments for {request.scope.describe()}",
            )

        worker_degraded = any(
            c.check == "nats_consumer" and c.status in ("critical", "warn") for c in self._diagnosis
        )
        applied: ApplySummary | None = None
        plan: PlanSummary | None = None
        for pass_no in range(MAX_PASSES):
            self._set_phase(Phase.RECONCILING)
            summary = await self._act(
                names.RECONCILE,
                ReconcileRequest(ref=ref, pass_no=pass_no),
                ReconcileSummary,
                f"Reconcile the four runbook checks for {request.scope.describe()}",
                timeout=600,
                heartbeat=True,
                attempts=20,
            )
            self._drift = dict(summary.counts)
            if pass_no == 0:
                await self._act(
                    names.SNAPSHOT_SCOPE,
                    SnapshotRequest(ref=ref, label="before"),
                    None,
                    "Capture before-remediation query evidence",
                )
            plan = await self._act(
                names.BUILD_PLAN,
                PlanRequest(
                    ref=ref,
                    pass_no=pass_no,
                    plan_id=f"{ref.run_id}-p{pass_no}",
                    # The worker is platform-wide: only a platform-wide run restarts it; a scoped run
                    # names the degradation (platform_degradation) instead.
                    restart_worker=worker_degraded and pass_no == 0 and request.scope.is_global,
                ),
                PlanSummary,
                "Build the remediation plan from the findings",
                timeout=600,
                heartbeat=True,
                attempts=20,
            )
            reset_for_plan(self._approval, plan, workflow.now())
            self._refresh_details()
            if request.dry_run:
                return Phase.DRY_RUN_COMPLETE, plan, None
            if not plan.empty:
                decided = await self._await_approval(plan)
                if decided is not None:
                    return decided, plan, applied
                try:
                    applied = await self._apply(plan)
                except ActivityError as err:
                    # Retries exhausted (a dependency down for long): stop and ask a human instead of
                    # failing half-way. A retry re-reconciles, so committed batches are not redone.
                    self._stalled = f"apply stopped: {activity_cause(err)}"
                    if await self._await_verdict_decision() == "hand_off":
                        return Phase.HANDED_OFF, plan, applied
                    continue
            verdict = await self._verify(request, pass_no)
            if verdict.passed:
                return Phase.COMPLETED, plan, applied
            choice = await self._await_verdict_decision()
            if choice == "hand_off":
                return Phase.HANDED_OFF, plan, applied
        return Phase.HANDED_OFF, plan, applied

    # ---------------------------------------------------------------- steps

    async def _diagnose(self, request: RemediationRequest, options: RuntimeOptions) -> None:
        ref = self._require_ref()
        self._set_phase(Phase.DIAGNOSING)
        scope_words = request.scope.describe()
        checks = await asyncio.gather(
            self._check(names.CHECK_POSTGRES, "postgres", ref, "Check Postgres connectivity"),
            self._check(
                names.CHECK_CONSUMER,
                "nats_consumer",
                ref,
                "Check the billing worker's NATS consumer (pending, ack-pending, redeliveries)",
            ),
            self._check(names.CHECK_OUTBOX, "outbox_relay", ref, "Check outbox relay backlog and lag"),
            self._check(
                names.QUERY_CORRELATION_LOGS,
                "loki_logs",
                ref,
                f"Search Loki for correlation id {request.correlation_id}",
            ),
            self._check(
                names.READ_EVENT_SEQUENCE,
                "event_sequence",
                ref,
                f"Validate the event sequence for {scope_words}",
            ),
            self._check(
                names.CHECK_DATA_CONSISTENCY,
                "data_consistency",
                ref,
                f"Check usage/ledger/allocation/attribution consistency for {scope_words}",
            ),
        )
        self._diagnosis = list(checks)
        trace_id = request.trace_id or next(
            (t for c in checks if c.check == "loki_logs" for t in c.trace_ids), None
        )
        if trace_id is not None:
            traced = ref.model_copy(update={"trace_id": trace_id})
            self._diagnosis.append(
                await self._check(
                    names.SUMMARIZE_TRACE, "tempo_trace", traced, f"Summarize Tempo trace {trace_id}"
                )
            )
        degraded = any(c.check == "nats_consumer" and c.status == "critical" for c in self._diagnosis)
        try:
            assessed = await self._act(
                names.ASSESS_BLAST_RADIUS,
                BlastRadiusRequest(
                    ref=ref,
                    worker_degraded=degraded,
                    widespread_org_threshold=options.widespread_org_threshold,
                ),
                BlastRadiusResult,
                f"Assess the blast radius around {scope_words}",
            )
            self._blast = assessed.radius
            if assessed.platform_degradation is not None:
                # Named, not inherited: the run's freeze and quorum follow its own scope and plan.
                self._diagnosis.append(assessed.platform_degradation)
        except ActivityError:
            # Without the numbers, assume the worst: widespread means freeze and quorum.
            self._blast = BlastRadius.WIDESPREAD
        workflow.upsert_search_attributes([SA_BLAST.value_set(self._blast.value)])
        self._refresh_details()

    async def _check(self, name: str, check: str, ref: RunRef, summary: str) -> CheckResult:
        """Run one diagnosis activity; a dependency that is down becomes a finding, not a crash."""
        try:
            result: CheckResult = await self._act(name, ref, CheckResult, summary, attempts=3)
            return result
        except ActivityError as err:
            return CheckResult(
                check=check, status="unreachable", headline=f"{check} unreachable: {activity_cause(err)}"
            )

    async def _await_approval(self, plan: PlanSummary) -> Phase | None:
        """Wait for the plan's approval; None when approved, else the ending phase."""
        if not await self._wait_for_decision(plan):
            self._set_phase(Phase.EXPIRED, approval="expired")
            return Phase.EXPIRED
        if self._approval.rejected_by is not None:
            self._set_phase(Phase.REJECTED, approval="rejected")
            return Phase.REJECTED
        self._set_phase(Phase.REMEDIATING, approval="approved")
        return None

    async def _wait_for_decision(self, plan: PlanSummary) -> bool:
        """Open the plan for approval, escalating at each deadline; False at the hard limit."""
        policy = self._require_options().policy
        self._announce(Phase.AWAITING_APPROVAL, approval="pending")
        waited = 0
        tier = 1
        while True:
            timeout = min(policy.deadline_seconds, policy.hard_limit_seconds - waited)
            deadline = asyncio.create_task(
                workflow.sleep(timedelta(seconds=timeout), summary=f"approval deadline (tier {tier})")
            )
            try:
                await self._open_gate(
                    Phase.AWAITING_APPROVAL, f"plan {plan.plan_id} open for approval (tier {tier})"
                )
                self._awaiting_approval = True
                await workflow.wait_condition(lambda timer=deadline: self._approval.decided or timer.done())  # type: ignore[misc]
            finally:
                self._awaiting_approval = False
                if not deadline.done():
                    deadline.cancel()
            if self._approval.decided:
                return True
            waited += timeout
            if waited >= policy.hard_limit_seconds:
                return False
            tier += 1
            await self._escalate(plan, tier)

    async def _open_gate(self, phase: Phase, message: str) -> None:
        """Enter ``phase`` (where Updates are accepted) only after a round trip to the server.

        A query can run workflow code ahead of the last completed workflow task (seen in the kill
        test: a worker restarted, the query applied a finished activity, the approver answered what it
        showed). The Update then lands in the same workflow task as that progress, and on replay Temporal
        runs the Update first: if entering the phase had issued commands, their order differs and the
        run fails with a nondeterminism error. So every command of the transition (search attributes,
        the deadline timer) is issued first, and the phase opens when this timeline activity returns,
        in an activation that issues none; an Update arriving together with it is refused by the
        validator (not yet open) and retried by the client.
        """
        await self._timeline(message, self._request.requested_by, "")
        self._phase = phase
        self._refresh_details()

    async def _escalate(self, plan: PlanSummary, tier: int) -> None:
        policy = self._require_options().policy
        next_approvers = [a.name for a in policy.approvers if a.tier == tier] or [
            a.name for a in policy.approvers
        ]
        await self._act(
            names.PUBLISH_ESCALATION,
            EscalationRequest(
                ref=self._require_ref(),
                plan_id=plan.plan_id,
                plan_hash=plan.plan_hash,
                action_count=plan.action_count,
                money_moved_minor=plan.money_moved_minor,
                next_tier=tier,
                next_approvers=next_approvers,
            ),
            None,
            f"Escalate the pending approval to tier {tier}",
        )

    async def _apply(self, plan: PlanSummary) -> ApplySummary:
        ref = self._require_ref()
        options = self._require_options()
        approvers = list(self._approval.approved_by)
        applied: ApplySummary = await self._act(
            names.APPLY_PLAN,
            ApplyRequest(
                ref=ref,
                plan_id=plan.plan_id,
                plan_hash=plan.plan_hash,
                actor=self._request.requested_by,
                approvers=approvers,
                batch_size=options.apply_batch_size,
            ),
            ApplySummary,
            f"Apply {plan.action_count} approved actions of plan {plan.plan_id} in batches",
            timeout=3600,
            heartbeat=True,
            attempts=50,
        )
        for action in plan.api_actions:
            activity = (
                names.CLEAR_RESTRICTION
                if action.kind == "clear_financial_restriction"
                else names.RESTART_BILLING_WORKER
            )
            request = ApiActionRequest(
                ref=ref,
                plan_id=plan.plan_id,
                action=action,
                actor=self._request.requested_by,
                approvers=approvers,
            )
            words = (
                "Clear the prepaid financial restriction of " + action.org_id
                if action.kind == "clear_financial_restriction"
                else "Restart the billing worker (hook)"
            )
            result = await self._act(activity, request, ApiActionResult, words)
            await self._act(
                names.RECORD_API_ACTION,
                ApiActionAudit(request=request, result=result),
                None,
                f"Audit: {action.kind} {result.outcome}",
            )
        self._refresh_details()
        return applied

    async def _verify(self, request: RemediationRequest, pass_no: int) -> VerificationResult:
        ref = self._require_ref()
        options = self._require_options()
        self._set_phase(Phase.VERIFYING)
        first = await self._consumer_sample("Sample billing worker consumer lag (1/2)")
        if options.verify_window_seconds:
            await workflow.sleep(options.verify_window_seconds, summary="verification window")
        second = await self._consumer_sample("Sample billing worker consumer lag (2/2)")
        criteria = [worker_criterion(first, second)]
        drift = await self._act(
            names.RECONCILE,
            ReconcileRequest(ref=ref, pass_no=100 + pass_no),
            ReconcileSummary,
            f"Re-run reconciliation for {request.scope.describe()} (expect no drift)",
            timeout=600,
            heartbeat=True,
        )
        self._drift = dict(drift.counts)
        criteria.append(
            Criterion(
                name="no_unresolved_drift",
                passed=drift.total == 0,
                detail=", ".join(f"{k}={v}" for k, v in drift.counts.items()),
            )
        )
        criteria.append(
            await self._act(
                names.CHECK_DUPLICATES,
                VerificationRequest(ref=ref, pass_no=pass_no),
                Criterion,
                "Check for duplicate debits and credits",
            )
        )
        outbox = await self._check(names.CHECK_OUTBOX, "outbox_relay", ref, "Re-check outbox relay (alerts)")
        criteria.append(
            Criterion(
                name="alerts_below_threshold", passed=outbox.status in ("ok", "warn"), detail=outbox.headline
            )
        )
        if request.trigger is Trigger.PREPAID_DEPLETED and request.scope.org_id:
            criteria.append(await self._verify_launch_guard(request, pass_no))
        self._verification = VerificationResult(passed=all(c.passed for c in criteria), criteria=criteria)
        await self._act(
            names.SNAPSHOT_SCOPE,
            SnapshotRequest(ref=ref, label="after"),
            None,
            "Capture after-remediation query evidence",
        )
        self._refresh_details()
        return self._verification

    async def _verify_launch_guard(self, request: RemediationRequest, pass_no: int) -> Criterion:
        """The launch-restriction verification, as a child workflow visible on its own in the UI."""
        org = request.scope.org_id or ""
        report = await workflow.execute_child_workflow(
            LaunchGuardWorkflow.run,
            LaunchGuardVerifyRequest(
                correlation_id=request.correlation_id,
                org_id=org,
                project_id=request.scope.project_id,
                expect="recovered",
                requested_by=request.requested_by,
            ),
            id=f"{workflow.info().workflow_id}-launch-guard-{pass_no}",
            static_summary=f"Verify launch precheck billing is ok for {org}",
        )
        return Criterion(
            name="launch_guard_recovered",
            passed=report.passed,
            detail="; ".join(f"{c.name}: {c.detail}" for c in report.criteria),
        )

    async def _consumer_sample(self, summary: str) -> ConsumerSample | None:
        try:
            result = await self._act(
                names.CHECK_CONSUMER, self._require_ref(), CheckResult, summary, attempts=3
            )
        except ActivityError:
            return None
        return ConsumerSample(
            pending=result.counts.get("pending", 0),
            ack_pending=result.counts.get("ack_pending", 0),
            redelivered=result.counts.get("redelivered", 0),
            seconds_since_active=result.counts.get("seconds_since_active"),
            status=result.status,
        )

    async def _await_verdict_decision(self) -> str:
        self._verdict = None
        self._announce(Phase.AWAITING_DECISION)
        await self._open_gate(Phase.AWAITING_DECISION, "verification failed: waiting for retry or hand-off")
        await workflow.wait_condition(lambda: self._verdict is not None)
        self._stalled = None
        verdict = self._verdict
        if verdict is None:  # unreachable: the condition above guarantees it
            raise ApplicationError("no verdict", type="BadInput", non_retryable=True)
        await self._timeline(f"decision: {verdict.choice}", verdict.actor, verdict.comment)
        return verdict.choice

    async def _cleanup(self, outcome: Phase, plan: PlanSummary | None) -> None:
        ref = self._require_ref()
        if self._frozen_id is not None:
            await self._act(
                names.UNFREEZE_ADJUSTMENTS,
                FreezeRequest(
                    ref=ref,
                    freeze_id=self._frozen_id,
                    actor=self._request.requested_by,
                    reason=f"remediation ended: {outcome.value}",
                ),
                None,
                "Lift the manual-adjustment freeze",
                attempts=20,
            )
            self._frozen_id = None
        self._set_phase(Phase.CAPTURING_EVIDENCE)
        await workflow.wait_condition(lambda: not self._audits and not self._auditing)
        await self._act(
            names.CAPTURE_EVIDENCE,
            EvidenceRequest(
                ref=ref,
                outcome=outcome.value,
                blast_radius=self._blast.value if self._blast else None,
                plan_id=plan.plan_id if plan else None,
                verification=self._verification,
                approvers=list(self._approval.approved_by),
            ),
            None,
            "Capture the evidence pack",
        )
        await self._act(
            names.FINISH_RUN,
            FinishRun(
                ref=ref,
                phase=outcome.value,
                outcome=outcome.value,
                blast_radius=self._blast.value if self._blast else None,
            ),
            None,
            f"Close the run as {outcome.value}",
        )
        self._set_phase(outcome)
        await workflow.wait_condition(workflow.all_handlers_finished)

    # ---------------------------------------------------------------- handlers

    @workflow.update(name=names.UPDATE_APPROVE)
    async def approve(self, decision: ApprovalDecision) -> str:
        """Approve or reject the plan awaiting approval (validated first; refusals are immediate)."""
        return await self._accept(decision, via="update")

    @approve.validator
    def _validate_approve(self, decision: ApprovalDecision) -> None:
        reason = self._refusal(decision)
        if reason is not None:
            raise ApplicationError(reason, type="ApprovalRefused", non_retryable=True)

    @workflow.signal(name=names.SIGNAL_APPROVE)
    async def approve_signal(self, decision: ApprovalDecision) -> None:
        """Signal path for approvals; a refused signal is audited since it cannot answer."""
        reason = self._refusal(decision)
        if reason is None:
            await self._accept(decision, via="signal")
            return
        self._audit(decision, reason=reason, via="signal")

    @workflow.update(name=names.UPDATE_DECIDE)
    async def decide(self, decision: VerdictDecision) -> str:
        """After a failed verification: retry the remediation or hand off to a human."""
        self._verdict = decision
        return f"{decision.choice} recorded"

    @decide.validator
    def _validate_decide(self, decision: VerdictDecision) -> None:
        if self._phase is not Phase.AWAITING_DECISION:
            raise ApplicationError(
                f"no decision is pending (phase {self._phase.value})", type="DecisionRefused"
            )
        if self._require_options().policy.approver(decision.actor) is None:
            raise ApplicationError(f"not an approver: {decision.actor!r}", type="DecisionRefused")

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
        )

    @workflow.query(name=names.QUERY_PLAN)
    def plan(self) -> PlanSummary | None:
        """The current plan (its actions are in Postgres: `remediate plan ID`)."""
        return self._approval.plan

    # ---------------------------------------------------------------- helpers

    def _refusal(self, decision: ApprovalDecision) -> str | None:
        if self._options is None:
            return "no plan is awaiting approval"
        return refusal(
            self._approval,
            decision,
            self._options.policy,
            self._request.requested_by,
            self._blast,
            awaiting=self._awaiting_approval,
            now=workflow.now(),
        )

    async def _accept(self, decision: ApprovalDecision, *, via: str) -> str:
        apply_decision(self._approval, decision, self._approvals_needed())
        state = (
            "rejected"
            if self._approval.rejected_by
            else ("approved" if self._approval.decided else "pending")
        )
        # Nothing here may depend on where the main coroutine is: on replay this may run first.
        workflow.upsert_search_attributes([SA_APPROVAL.value_set(state)])
        self._refresh_details()
        self._audit(decision, reason=None, via=via)
        return (
            f"{decision.decision} by {decision.approver} recorded "
            f"({len(self._approval.approved_by)}/{self._approvals_needed()} approvals)"
        )

    def _audit(self, decision: ApprovalDecision, *, reason: str | None, via: str) -> None:
        """Queue a decision's audit for the auditor coroutine, so the handler finishes in its own task.

        A handler that awaited the audit activity stayed open across workflow tasks; a second approval
        arriving in the task that completed the first one's audit then replayed in a different order
        (a nondeterminism error after a worker restart, seen in the kill test).
        """
        self._audits.append((decision, reason, via))

    async def _audit_approvals(self) -> None:
        """Record queued approval audits in order (one activity each)."""
        while True:
            await workflow.wait_condition(lambda: bool(self._audits))
            decision, reason, via = self._audits.pop(0)
            self._auditing = True
            try:
                await self._record_approval(decision, reason=reason, via=via)
            finally:
                self._auditing = False

    async def _record_approval(self, decision: ApprovalDecision, *, reason: str | None, via: str) -> None:
        ref = self._require_ref()
        self._events += 1
        plan = self._approval.plan
        await self._act(
            names.RECORD_APPROVAL,
            ApprovalRecord.of(
                decision,
                run_id=ref.run_id,
                event_key=f"{ref.run_id}:approval:{self._events}",
                plan_id=plan.plan_id if plan else None,
                refusal_reason=reason,
                via=via,
            ),
            None,
            f"Audit {decision.decision} by {decision.approver}"
            + ("" if reason is None else f" (refused: {reason})"),
        )
        self._refresh_details()

    async def _timeline(self, message: str, actor: str, comment: str) -> None:
        ref = self._require_ref()
        self._events += 1
        await self._act(
            names.RECORD_TIMELINE,
            TimelineEvent(
                run_id=ref.run_id,
                event_key=f"{ref.run_id}:wf:{self._events}",
                phase=self._phase.value,
                actor=actor,
                message=message,
                detail={"comment": comment},
            ),
            None,
            f"Timeline: {message}",
        )

    def _approvals_needed(self) -> int:
        if self._options is None or self._approval.plan is None:
            return 0
        return approvals_required(self._options.policy, self._approval.plan, self._blast)

    async def _act(
        self,
        name: str,
        arg: Any,
        result_type: type[R] | None,
        summary: str,
        *,
        timeout: int | None = None,
        heartbeat: bool = False,
        attempts: int = 5,
    ) -> Any:
        """Execute activity ``name`` with explicit timeouts, a bounded retry policy and a UI summary."""
        return await workflow.execute_activity(
            name,
            args=[] if arg is None else [arg],
            result_type=result_type,
            **activity_options(
                self._options, timeout=timeout, heartbeat=heartbeat, attempts=attempts, summary=summary
            ),
        )

    def _set_phase(self, phase: Phase, *, approval: str | None = None) -> None:
        self._phase = phase
        self._announce(phase, approval=approval)

    def _announce(self, phase: Phase, *, approval: str | None = None) -> None:
        """Log the transition and upsert the phase search attributes (``_phase`` is set by the caller)."""
        # workflow.logger is replay-safe: each transition is logged once, with the run's context.
        workflow.logger.info(
            "phase %s",
            phase.value,
            extra={
                "phase": phase.value,
                "correlation_id": self._request.correlation_id,
                "actor": self._request.requested_by,
            },
        )
        updates = [SA_PHASE.value_set(phase.value)]
        if approval is not None:
            updates.append(SA_APPROVAL.value_set(approval))
        workflow.upsert_search_attributes(updates)
        self._refresh_details()

    def _upsert_scope_attributes(self) -> None:
        request = self._request
        pairs = scope_values(request.correlation_id, request.trigger.value, request.scope)
        workflow.upsert_search_attributes(
            [key.value_set(value) for key, value in pairs]
            + [SA_PHASE.value_set(self._phase.value), SA_APPROVAL.value_set("not_requested")]
        )

    def _refresh_details(self) -> None:
        """Markdown shown live in the Temporal UI: phase, drift, plan, approvals, verdict."""
        workflow.set_current_details(
            details_markdown(
                phase=self._phase,
                request=self._request,
                blast=self._blast,
                frozen=self._frozen_id is not None,
                alerts=list(self._alerts.values()),
                diagnosis=self._diagnosis,
                drift=self._drift,
                approval=self._approval,
                approvals_needed=self._approvals_needed(),
                stalled=self._stalled,
                verification=self._verification,
            )
        )

    def _require_ref(self) -> RunRef:
        if self._ref is None:
            raise ApplicationError("workflow not initialised", type="BadInput", non_retryable=True)
        return self._ref

    def _require_options(self) -> RuntimeOptions:
        if self._options is None:
            raise ApplicationError("runtime options not loaded", type="BadInput", non_retryable=True)
        return self._options


__all__ = ["STEPS_MARKDOWN", "BillingRemediationWorkflow"]
