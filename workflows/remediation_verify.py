"""Verification: the runbook's recovery criteria after an apply (worker, drift, duplicates, alerts,
launch guard), each a named pass/fail with the figures it was judged on."""

from __future__ import annotations

import contextlib

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.alertmanager import AlertmanagerActivities
    from activities.postgres import BillingDatabaseActivities
    from activities.postgres.records import RecordsActivities
    from contracts.models import (
        LEFT_NAMED,
        AlertCheckRequest,
        AlertCheckResult,
        Criterion,
        LaunchGuardVerifyRequest,
        Phase,
        ReconcileRequest,
        RemediationRequest,
        SnapshotRequest,
        Trigger,
        VerificationRequest,
        VerificationResult,
    )
    from workflows.criteria import drift_criterion, worker_criterion
    from workflows.launch_guard import LaunchGuardWorkflow
    from workflows.remediation_worker import WorkerSteps


class VerifySteps(WorkerSteps):
    """The recovery criteria."""

    async def _verify(self, request: RemediationRequest, pass_no: int) -> VerificationResult:
        ref = self._require_ref()
        options = self._require_options()
        self._set_phase(Phase.VERIFYING)
        first = await self._consumer_sample("Sample billing worker consumer lag (1/2)")
        if options.verify_window_seconds:
            await workflow.sleep(options.verify_window_seconds, summary="verification window")
        second = await self._consumer_sample("Sample billing worker consumer lag (2/2)")
        criteria = [worker_criterion(first, second, options.consumer_pending_threshold)]
        rollback = await self._rollback_criterion(self._approval.plan)
        if rollback is not None:
            criteria.append(rollback)
        drift = await self._act(
            BillingDatabaseActivities.reconcile,
            ReconcileRequest(ref=ref, pass_no=100 + pass_no, name_left=LEFT_NAMED),
            f"Re-run reconciliation for {request.scope.describe()} (expect no drift)",
            timeout=600,
            heartbeat=True,
        )
        self._drift = dict(drift.counts)
        criteria.append(drift_criterion(drift))
        criteria.append(
            await self._act(
                BillingDatabaseActivities.check_duplicates,
                VerificationRequest(ref=ref, pass_no=pass_no),
                "Check for duplicate debits and credits",
            )
        )
        criteria.append(await self._alerts_criterion(request, drift.follow_up_orgs))
        if request.trigger is Trigger.PREPAID_DEPLETED and request.scope.org_id:
            criteria.append(await self._verify_launch_guard(request, pass_no))
        self._verification = VerificationResult(passed=all(c.passed for c in criteria), criteria=criteria)
        await self._act(
            RecordsActivities.snapshot_scope,
            SnapshotRequest(ref=ref, label="after", pass_no=100 + pass_no),
            "Capture after-remediation query evidence",
        )
        self._refresh_details()
        return self._verification

    async def _alerts_criterion(self, request: RemediationRequest, handed_over_orgs: list[str]) -> Criterion:
        """Criterion 4 from Alertmanager; once it passes, the "resolved" notifications of the alerts
        recorded on this run are awaited (bounded) so they are recorded on it before it ends."""
        ref = self._require_ref()
        firing = [
            n.fingerprint
            for key, n in self._alerts.items()
            if n.source == "alertmanager" and n.status == "firing"
        ]
        checked: AlertCheckResult = await self._act(
            AlertmanagerActivities.check_alerts,
            AlertCheckRequest(ref=ref, recorded_firing=firing, handed_over_orgs=handed_over_orgs),
            f"Check Alertmanager: runbook alerts for {request.scope.describe()} (criterion 4)",
        )
        if not checked.criterion.passed or not firing:
            return checked.criterion

        def received(fingerprint: str) -> bool:
            return f"alertmanager:{fingerprint}:resolved" in self._alerts

        pending = [f for f in checked.resolved_in_alertmanager if not received(f)]
        wait = self._require_options().alert_resolved_wait_seconds
        if pending:
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: all(received(f) for f in pending),
                    timeout=wait,
                    timeout_summary="Alertmanager's resolved notifications",
                )
        notified = sum(1 for f in firing if received(f))
        quiet = sum(1 for f in checked.resolved_in_alertmanager if not received(f))
        still = len(firing) - notified - quiet
        parts = [f"{notified} resolved (notification recorded)"]
        if quiet:
            parts.append(f"{quiet} resolved in Alertmanager, no notification within {wait} s")
        if still:
            parts.append(f"{still} still firing, handed over")
        note = f"; of the {len(firing)} alert(s) recorded on this run: " + ", ".join(parts)
        return checked.criterion.model_copy(update={"detail": checked.criterion.detail + note})

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
