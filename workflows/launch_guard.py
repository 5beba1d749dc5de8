"""The runbook's "Launch Restriction Verification" as its own workflow.

Reads the org's financial posture, runs the launch precheck for a SKU and, while launches are expected to
be blocked, probes submit (expecting HTTP 402 ``insufficient_balance``); then compares every observation
with the expected state. Orchestration only; the probes are activities of the admin billing API adapter.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Literal, TypeVar

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.billing_api import BillingApiActivities
    from contracts import names
    from contracts.models import (
        Criterion,
        LaunchGuardReport,
        LaunchGuardVerifyRequest,
        LaunchProbe,
        Phase,
        PostureObservation,
        PrecheckObservation,
        Scope,
        SubmitObservation,
    )
    from workflows.search_attributes import SA_PHASE, scope_values

from workflows.activity_calls import retry_policy

T = TypeVar("T")
TRIGGER = "launch_guard"
RESTRICTED_REASON = "prepaid_balance_depleted"
_RETRY = retry_policy(attempts=5, max_interval=10)


def _check(name: str, expected: object, actual: object) -> Criterion:
    return Criterion(name=name, passed=expected == actual, detail=f"expected {expected}, got {actual}")


def launch_guard_criteria(
    expect: Literal["restricted", "recovered"],
    posture: PostureObservation,
    precheck: PrecheckObservation,
    submit: SubmitObservation | None,
) -> list[Criterion]:
    """Each observed field against the runbook's expected restricted (or recovered) state."""
    if expect == "restricted":
        criteria = [
            _check("posture_state", "restricted", posture.state),
            _check("posture_reason", RESTRICTED_REASON, posture.reason),
            _check("effects.block_new_launches", True, posture.block_new_launches),
            _check("precheck_billing_severity", "blocker", precheck.billing_severity),
        ]
        if submit is not None:
            criteria.append(
                _check(
                    "submit_refused",
                    "HTTP 402 insufficient_balance",
                    f"HTTP {submit.status_code} {submit.code}",
                )
            )
        return criteria
    # Recovery: the restriction is cleared ("none") or downgraded ("warning"); either way launches proceed.
    return [
        Criterion(
            name="posture_state",
            passed=posture.state != "restricted",
            detail=f"expected not restricted, got {posture.state}",
        ),
        _check("effects.block_new_launches", False, posture.block_new_launches),
        _check("precheck_billing_severity", "ok", precheck.billing_severity),
    ]


@workflow.defn(name=names.LAUNCH_GUARD_WORKFLOW)
class LaunchGuardWorkflow:
    """Verify the product launch boundary of one org/project against the expected state."""

    def __init__(self) -> None:
        self._report: LaunchGuardReport | None = None

    @workflow.run
    async def run(self, request: LaunchGuardVerifyRequest) -> LaunchGuardReport:
        """Posture, precheck, (submit probe), compare."""
        pairs = scope_values(
            request.correlation_id, TRIGGER, Scope(org_id=request.org_id, project_id=request.project_id)
        )
        updates = [key.value_set(value) for key, value in pairs] + [SA_PHASE.value_set(Phase.VERIFYING.value)]
        workflow.upsert_search_attributes(updates)
        where = request.org_id + (f"/{request.project_id}" if request.project_id else "")
        probe = request.probe()
        posture = await self._probe(
            BillingApiActivities.read_posture, probe, f"Read financial posture of {request.org_id}"
        )
        if posture.org_id != request.org_id:
            # The project named belongs to another org: comparing would verify the wrong customer.
            raise ApplicationError(
                f"project {request.project_id} belongs to org {posture.org_id}, not {request.org_id}",
                type="BadInput",
                non_retryable=True,
            )
        precheck = await self._probe(
            BillingApiActivities.run_precheck, probe, f"Launch precheck {request.sku} for {where}"
        )
        submit: SubmitObservation | None = None
        if request.expect == "restricted" and request.probe_submit:
            submit = await self._probe(
                BillingApiActivities.probe_submit, probe, f"Probe launch submit for {where} (expect 402)"
            )
        criteria = launch_guard_criteria(request.expect, posture, precheck, submit)
        passed = all(c.passed for c in criteria)
        self._report = LaunchGuardReport(
            expect=request.expect,
            passed=passed,
            criteria=criteria,
            posture=posture,
            precheck=precheck,
            submit=submit,
        )
        workflow.upsert_search_attributes(
            [SA_PHASE.value_set((Phase.COMPLETED if passed else Phase.FAILED).value)]
        )
        lines = [f"### Launch guard {request.expect}: {'PASSED' if passed else 'FAILED'}", ""]
        lines += [f"- {'✅' if c.passed else '❌'} **{c.name}**: {c.detail}" for c in criteria]
        workflow.set_current_details("\n".join(lines))
        return self._report

    @workflow.query(name=names.QUERY_LAUNCH_GUARD)
    def report(self) -> LaunchGuardReport | None:
        """The verdict so far (None until every probe answered)."""
        return self._report

    @staticmethod
    async def _probe(
        activity: Callable[[Any, LaunchProbe], Awaitable[T]], probe: LaunchProbe, summary: str
    ) -> T:
        result: T = await workflow.execute_activity_method(
            activity,
            probe,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=_RETRY,
            summary=summary,
        )
        return result
