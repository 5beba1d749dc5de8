"""The billing worker's side of a remediation: the admin-API plan actions (restriction clears, worker
restart or rollback) and the rollback's verification.

A rollback is planned instead of a restart when diagnosis suspects a runtime regression of the
worker's current revision (``worker_regression``): a restart would run the same bad code again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.billing_api import BillingApiActivities
    from activities.postgres.records import RecordsActivities
    from contracts.models import (
        ActionKind,
        ApiAction,
        ApiActionAudit,
        ApiActionRequest,
        ApiActionResult,
        Criterion,
        PlanSummary,
        WorkerDeployments,
    )
    from workflows.activity_calls import activity_cause
    from workflows.remediation_payments import PaymentSteps

API_ACTIVITIES: dict[ActionKind, Callable[[Any, ApiActionRequest], Awaitable[ApiActionResult]]] = {
    ActionKind.CLEAR_FINANCIAL_RESTRICTION: BillingApiActivities.clear_restriction,
    ActionKind.RESTART_BILLING_WORKER: BillingApiActivities.restart_billing_worker,
    ActionKind.ROLLBACK_BILLING_WORKER: BillingApiActivities.rollback_billing_worker,
}


def _words(action: ApiAction) -> str:
    if action.kind is ActionKind.CLEAR_FINANCIAL_RESTRICTION:
        return "Clear the prepaid financial restriction of " + action.org_id
    if action.kind is ActionKind.ROLLBACK_BILLING_WORKER:
        return (
            f"Roll the billing worker back from revision {action.from_revision} to {action.target_revision}"
            f" ({action.hook or 'hook'})"
        )
    return f"Restart the billing worker ({action.hook or 'hook'})"


class WorkerSteps(PaymentSteps):
    """Admin-API actions of an approved plan and the worker rollback's criterion."""

    def _rollback_target(self) -> int | None:
        """The revision to roll back to when diagnosis suspects a runtime regression, else None."""
        return next(
            (
                c.counts.get("rollback_to")
                for c in self._diagnosis
                if c.check == "worker_regression" and c.status == "critical"
            ),
            None,
        )

    def _rollback_source(self) -> int | None:
        """The revision diagnosis blamed (the one a rollback replaces), else None."""
        return next(
            (c.counts.get("current_revision") for c in self._diagnosis if c.check == "worker_regression"),
            None,
        )

    async def _api_actions(self, plan: PlanSummary, approvers: list[str]) -> None:
        """Carry out the plan's admin-API actions, each audited with its result."""
        ref = self._require_ref()
        for action in plan.api_actions:
            request = ApiActionRequest(
                ref=ref,
                plan_id=plan.plan_id,
                action=action,
                actor=self._request.requested_by,
                approvers=approvers,
            )
            result = await self._act(API_ACTIVITIES[action.kind], request, _words(action))
            await self._act(
                RecordsActivities.record_api_action,
                ApiActionAudit(request=request, result=result),
                f"Audit: {action.kind} {result.outcome}",
            )

    async def _rollback_criterion(self, plan: PlanSummary | None) -> Criterion | None:
        """After an approved rollback: the worker runs the target revision (None when none was planned)."""
        target = next(
            (
                a.target_revision
                for a in (plan.api_actions if plan else [])
                if a.kind is ActionKind.ROLLBACK_BILLING_WORKER
            ),
            None,
        )
        if target is None:
            return None
        try:
            deployments: WorkerDeployments = await self._act(
                BillingApiActivities.read_worker_deployments,
                self._require_ref(),
                "Read the billing worker's running revision",
                attempts=3,
            )
        except ActivityError as err:
            return Criterion(
                name="worker_rolled_back", passed=False, detail=f"unknown: {activity_cause(err)}"
            )
        current = deployments.current
        return Criterion(
            name="worker_rolled_back",
            passed=current.revision == target,
            detail=f"the billing worker runs {current.version} (revision {current.revision});"
            f" the approved rollback target is revision {target}",
        )
