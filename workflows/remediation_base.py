"""The remediation workflow's state and the helpers its steps share: activity calls, phases, timeline,
the UI's details. Orchestration lives in ``remediation``, approvals in ``remediation_approvals``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.nats_jetstream import NatsActivities
    from activities.postgres.records import RecordsActivities
    from contracts.models import (
        AlertNotice,
        ApprovalDecision,
        BlastRadius,
        CheckResult,
        ConsumerSample,
        Phase,
        RemediationRequest,
        RunRef,
        RuntimeOptions,
        TimelineEvent,
        VerdictDecision,
        VerificationResult,
    )
    from workflows.activity_calls import run_activity
    from workflows.approval import (
        ApprovalState,
        approvals_required,
    )
    from workflows.details import details_markdown
    from workflows.search_attributes import SA_APPROVAL, SA_PHASE, scope_values

A = TypeVar("A")
T = TypeVar("T")


class RemediationBase:
    """State of one remediation run and the helpers every step uses."""

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
        self._payments: dict[str, int] = {}
        self._waiting: str | None = None
        self._ref: RunRef | None = None
        self._events = 0
        self._alerts: dict[str, AlertNotice] = {}
        # The "before" query evidence, taken while the plan is built and awaited before anything changes.
        self._before: asyncio.Task[None] | None = None
        # The checks still answering while the first pass reconciles (runs from reconcile-beside-diagnosis).
        self._diagnosis_rest: asyncio.Task[None] | None = None
        # The provider's answers about the scope's unreconciled payments, asked while diagnosing.
        self._prefetch: asyncio.Task[int] | None = None
        # Approval audits waiting for the auditor coroutine (handlers never await activities).
        self._audits: list[tuple[ApprovalDecision, str | None, str]] = []
        # Approver pages (Alertmanager): tiers paged for the plan now waiting, since when, in flight.
        self._paged: list[str] = []
        self._page_opened = datetime.fromtimestamp(0, UTC)
        self._page_tasks: list[asyncio.Task[None]] = []
        self._auditing = False

    async def _timeline(self, message: str, actor: str, comment: str, *, phase: Phase | None = None) -> None:
        """Record an event under ``phase`` (default: the current one)."""
        ref = self._require_ref()
        self._events += 1
        await self._act(
            RecordsActivities.record_timeline,
            TimelineEvent(
                run_id=ref.run_id,
                event_key=f"{ref.run_id}:wf:{self._events}",
                phase=(phase or self._phase).value,
                actor=actor,
                message=message,
                detail={"comment": comment},
            ),
            f"Timeline: {message}",
        )

    def _approvals_needed(self) -> int:
        if self._options is None or self._approval.plan is None:
            return 0
        return approvals_required(self._options.policy, self._approval.plan, self._blast)

    async def _act(
        self,
        activity: Callable[[Any, A], Awaitable[T]],
        arg: A,
        summary: str,
        *,
        timeout: int | None = None,
        heartbeat: bool = False,
        attempts: int = 5,
    ) -> T:
        """Execute the activity method with explicit timeouts, a bounded retry policy and a UI summary.

        Called by reference (``Class.method``): mypy checks the argument and the result at every call,
        and a reader follows the call to its code. History records the method's stable name.
        """
        return await run_activity(
            activity, arg, summary, self._options, timeout=timeout, heartbeat=heartbeat, attempts=attempts
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
                payments=self._payments,
                waiting=self._waiting,
            )
        )

    async def _consumer_sample(self, summary: str) -> ConsumerSample | None:
        try:
            result = await self._act(NatsActivities.check_consumer, self._require_ref(), summary, attempts=3)
        except ActivityError:
            return None
        # None when the consumer does not exist: nothing measured.
        return ConsumerSample.of(result)

    def _require_ref(self) -> RunRef:
        if self._ref is None:
            raise ApplicationError("workflow not initialised", type="BadInput", non_retryable=True)
        return self._ref

    def _require_options(self) -> RuntimeOptions:
        if self._options is None:
            raise ApplicationError("runtime options not loaded", type="BadInput", non_retryable=True)
        return self._options
