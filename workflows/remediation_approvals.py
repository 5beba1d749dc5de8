"""The remediation's approval gate and decisions: waits, escalation, the approve/decide handlers and the
audit of every decision (queued for an auditor coroutine; handlers never await activities)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.approver_pages import ApproverPageActivities
    from activities.nats_jetstream import NatsActivities
    from activities.postgres.records import RecordsActivities
    from contracts import names
    from contracts.models import (
        ApprovalDecision,
        ApprovalRecord,
        EscalationRequest,
        Phase,
        PlanSummary,
        VerdictDecision,
    )
    from contracts.pages import ApproverPage
    from workflows.activity_calls import activity_cause
    from workflows.approval import (
        apply_decision,
        refusal,
    )
    from workflows.remediation_base import RemediationBase
    from workflows.search_attributes import SA_APPROVAL


# Runs from this version on page approvers through Alertmanager (older histories escalated on NATS).
PAGES_PATCH = "approver-pages-alertmanager"


class ApprovalSteps(RemediationBase):
    """Approval waits with escalation, verdict decisions, and their signal/update handlers."""

    async def _await_approval(self, plan: PlanSummary) -> Phase | None:
        """Wait for the plan's approval; None when approved, else the ending phase."""
        decided = await self._wait_for_decision(plan)
        await self._resolve_pages(plan)
        if not decided:
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
        paging = workflow.patched(PAGES_PATCH)
        self._paged = []
        self._page_opened = workflow.now()
        waited = 0
        tier = 1
        while True:
            timeout = min(policy.deadline_seconds, policy.hard_limit_seconds - waited)
            deadline = asyncio.create_task(
                workflow.sleep(timedelta(seconds=timeout), summary=f"approval deadline (tier {tier})")
            )
            if paging:
                # Issued with the timer, before the gate opens (see _open_gate); never awaited on the way.
                self._page(plan, tier)
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
            if not paging:
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
        # Recorded under the phase it opens (the phase itself opens once the record is written).
        await self._timeline(message, self._request.requested_by, "", phase=phase)
        self._phase = phase
        self._refresh_details()

    def _page(self, plan: PlanSummary, tier: int) -> None:
        """Page ``tier`` (and keep paging the tiers before it) through Alertmanager, in the background."""
        policy = self._require_options().policy
        label = str(tier) if any(a.tier == tier for a in policy.approvers) else "all"
        if label not in self._paged:
            self._paged.append(label)
        self._page_tasks.append(asyncio.create_task(self._send_page(plan, resolve=False)))

    async def _resolve_pages(self, plan: PlanSummary | None) -> None:
        """Resolve every tier's page (decided, expired, or the run ended): receivers get "resolved"."""
        if not self._paged or plan is None:
            return
        await self._send_page(plan, resolve=True)
        self._paged = []
        for task in self._page_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._page_tasks = []

    async def _send_page(self, plan: PlanSummary, *, resolve: bool) -> None:
        """One post to Alertmanager; a pager that is down is noted in the timeline, never blocks approval."""
        options = self._require_options()
        ref = self._require_ref()
        approvers = {
            label: [a.name for a in options.policy.approvers if label == "all" or str(a.tier) == label]
            for label in self._paged
        }
        page = ApproverPage(
            ref=ref,
            plan_id=plan.plan_id,
            tiers=list(self._paged),
            approvers=approvers,
            opened_at=self._page_opened,
            until=self._page_opened + timedelta(seconds=options.policy.hard_limit_seconds),
            resolve=resolve,
            blast_radius=self._blast.value if self._blast else "",
            action_count=plan.action_count,
            money_moved_minor=plan.money_moved_minor,
            approvals=len(self._approval.approved_by),
            approvals_needed=self._approvals_needed(),
            requested_by=self._request.requested_by,
            approval_link=f"{options.approval_page_url}/runs/{ref.workflow_id}"
            if options.approval_page_url
            else "",
        )
        what = "Resolve the approvers' pages" if resolve else f"Page approvers, tier {self._paged[-1]}"
        try:
            await self._act(ApproverPageActivities.page_approvers, page, f"{what} (Alertmanager)", attempts=3)
        except ActivityError as err:
            workflow.logger.warning("approver page not delivered: %s", activity_cause(err))

    async def _escalate(self, plan: PlanSummary, tier: int) -> None:
        """Runs started before approver pages: the escalation on NATS (kept so their histories replay)."""
        policy = self._require_options().policy
        next_approvers = [a.name for a in policy.approvers if a.tier == tier] or [
            a.name for a in policy.approvers
        ]
        await self._act(
            NatsActivities.publish_escalation,
            EscalationRequest(
                ref=self._require_ref(),
                plan_id=plan.plan_id,
                plan_hash=plan.plan_hash,
                action_count=plan.action_count,
                money_moved_minor=plan.money_moved_minor,
                next_tier=tier,
                next_approvers=next_approvers,
            ),
            f"Escalate the pending approval to tier {tier}",
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

    @workflow.update(name=names.UPDATE_APPROVE)
    async def approve(self, decision: ApprovalDecision) -> str:
        """Approve or reject the plan awaiting approval (validated first; refusals are immediate)."""
        return await self._accept(decision, via=_via(decision, "update"))

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
            await self._accept(decision, via=_via(decision, "signal"))
            return
        self._audit(decision, reason=reason, via=_via(decision, "signal"))

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
            RecordsActivities.record_approval,
            ApprovalRecord.of(
                decision,
                run_id=ref.run_id,
                event_key=f"{ref.run_id}:approval:{self._events}",
                # The plan the approver signed (a refused stale decision names its own, not the current).
                plan_id=decision.plan_id or (plan.plan_id if plan else None),
                refusal_reason=reason,
                via=via,
            ),
            f"Audit {decision.decision} by {decision.approver}"
            + ("" if reason is None else f" (refused: {reason})"),
        )
        self._refresh_details()


def _via(decision: ApprovalDecision, path: str) -> str:
    """Where a decision came from, as audited: the path (update/signal) and the client that sent it."""
    return f"{path} from {decision.client.replace('_', ' ')}" if decision.client else path
