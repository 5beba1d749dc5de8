"""Approval rules, pure and deterministic: used by the workflow's validator and signal handler alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from contracts.models import ApprovalDecision, ApprovalPolicy, BlastRadius, PlanSummary
from contracts.signatures import signature_problem


@dataclass
class ApprovalState:
    """Approvals collected for the current plan."""

    plan: PlanSummary | None = None
    plan_ready_at: datetime | None = None
    approved_by: list[str] = field(default_factory=list)
    rejected_by: str | None = None
    decided: bool = False


def high_risk(policy: ApprovalPolicy, plan: PlanSummary, radius: BlastRadius | None) -> bool:
    """The run's own risk: a platform-wide scope, more money than the threshold, or more rows than it."""
    return (
        radius is BlastRadius.WIDESPREAD
        or plan.money_moved_minor > policy.money_threshold_minor
        or (policy.rows_threshold is not None and plan.action_count > policy.rows_threshold)
    )


def approvals_required(policy: ApprovalPolicy, plan: PlanSummary, radius: BlastRadius | None) -> int:
    """Quorum for high-risk plans, else a single approver."""
    return min(policy.quorum, len(policy.approvers)) if high_risk(policy, plan, radius) else 1


# A transient refusal: the plan exists but approvals open a moment later (or reopen after an
# escalation); clients retry it.
NOT_OPEN = "not open yet: the plan is being opened for approval; retry in a moment"


def self_approval_forbidden(policy: ApprovalPolicy, plan: PlanSummary, radius: BlastRadius | None) -> bool:
    """The requester may not approve their own high-risk plan, nor ever their own reversal."""
    return plan.reverses_run_id is not None or high_risk(policy, plan, radius)


def refusal(
    state: ApprovalState,
    decision: ApprovalDecision,
    policy: ApprovalPolicy,
    requester: str,
    radius: BlastRadius | None,
    *,
    awaiting: bool,
    now: datetime,
) -> str | None:
    """Why ``decision`` must be refused, or None when it is acceptable."""
    approver = policy.approver(decision.approver)
    if approver is None:
        return f"not an approver: {decision.approver!r} is not in the configured approvers"
    if state.plan is None or state.plan_ready_at is None:
        return "no plan is awaiting approval"
    if state.decided:
        return "already decided"
    if not awaiting:
        return NOT_OPEN
    if decision.plan_hash != state.plan.plan_hash:
        return f"stale plan: the plan awaiting approval has hash {state.plan.plan_hash[:12]}…"
    if policy.require_signatures:
        problem = signature_problem(decision, approver, state.plan, state.plan_ready_at, now)
        if problem is not None:
            return problem
    if decision.approver in state.approved_by:
        return f"already approved by {decision.approver}"
    if (
        decision.decision == "approve"
        and decision.approver == requester
        and self_approval_forbidden(policy, state.plan, radius)
    ):
        what = "reversal" if state.plan.reverses_run_id else "widespread or above-threshold plan"
        return f"self-approval: the requester cannot approve their own {what}"
    return None


def apply_decision(state: ApprovalState, decision: ApprovalDecision, required: int) -> None:
    """Record an accepted decision; one rejection decides, approvals decide at quorum."""
    if decision.decision == "reject":
        state.rejected_by = decision.approver
        state.decided = True
        return
    state.approved_by.append(decision.approver)
    if len(state.approved_by) >= required:
        state.decided = True


def reset_for_plan(state: ApprovalState, plan: PlanSummary, ready_at: datetime) -> None:
    """A new plan needs fresh approvals, signed after it was built."""
    state.plan = plan
    state.plan_ready_at = ready_at
    state.approved_by = []
    state.rejected_by = None
    state.decided = False
