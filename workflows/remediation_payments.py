"""The payment step of reconciliation: every payment finding gets the provider's verdict before a plan.

While the provider does not answer, the run waits visibly (phase ``waiting_on_provider`` and the
details say how many sessions and why) and asks again with backoff; it never plans on its own word.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.payment_checks import PaymentCheckActivities
    from activities.postgres import BillingDatabaseActivities
    from contracts.models import (
        CREDIT_REVOKED,
        DriftKind,
        PaymentCheckSummary,
        Phase,
        ReconcileRequest,
        ReconcileSummary,
    )
    from workflows.remediation_approvals import ApprovalSteps

MAX_PROVIDER_WAIT_SECONDS = 600  # backoff ceiling: history grows by a few events per ask
# Runs started after reversals existed also re-check the credits remediations posted (older histories
# replay without that activity).
REVOKED_CREDITS_PATCH = "reversal-revoked-credits"
# Runs started after this re-check those credits beside the reconciliation, not after it.
OVERLAPPED_CREDITS_PATCH = "overlapped-credits-check"


class PaymentSteps(ApprovalSteps):
    """Provider verdicts for a reconciliation pass's payment findings."""

    async def _reconcile_and_confirm(self, pass_no: int, scope_words: str) -> ReconcileSummary:
        """One reconciliation pass before a plan: the payment check first (it is the quick one), then the
        provider is asked about its findings while the other three checks run; the pass's summary."""
        ref = self._require_ref()
        # Only the pass before the first plan may start from the drift watch; verification reads every row.
        from_watch = pass_no == 0 and self._require_options().plan_from_watch
        payments: ReconcileSummary = await self._act(
            BillingDatabaseActivities.reconcile,
            ReconcileRequest(
                ref=ref,
                pass_no=pass_no,
                kinds=[DriftKind.PAYMENT_DRIFT],
                completes_pass=False,
                from_watch=from_watch,
            ),
            f"Reconcile payment sessions for {scope_words}",
            timeout=600,
            heartbeat=True,
            attempts=20,
        )
        rest = asyncio.create_task(
            self._act(
                BillingDatabaseActivities.reconcile,
                ReconcileRequest(
                    ref=ref,
                    pass_no=pass_no,
                    kinds=[k for k in DriftKind if k is not DriftKind.PAYMENT_DRIFT],
                    from_watch=from_watch,
                ),
                f"Reconcile usage, allocations and the ledger for {scope_words}",
                timeout=600,
                heartbeat=True,
                attempts=20,
            )
        )

        def credits() -> Coroutine[Any, Any, int]:
            return self._act(
                PaymentCheckActivities.check_remediation_credits,
                ReconcileRequest(ref=ref, pass_no=pass_no),
                f"Ask the payment provider whether credits remediations posted for {scope_words} were since"
                " refunded or disputed",
                timeout=600,
                heartbeat=True,
                attempts=20,
            )

        # The credits' re-check reads no finding of the pass: it runs beside the other checks.
        beside = asyncio.create_task(credits()) if workflow.patched(OVERLAPPED_CREDITS_PATCH) else None
        await self._confirm_payments(pass_no, payments.counts)
        summary: ReconcileSummary = await rest
        if beside is not None or workflow.patched(REVOKED_CREDITS_PATCH):
            revoked = await (beside if beside is not None else credits())
            if revoked:
                counts = dict(summary.counts) | {CREDIT_REVOKED: revoked}
                summary = summary.model_copy(update={"counts": counts, "total": summary.total + revoked})
        return summary

    async def _confirm_payments(self, pass_no: int, counts: dict[str, int]) -> None:
        """Ask the provider about the pass's payment findings until it has answered for every one."""
        if not counts.get(DriftKind.PAYMENT_DRIFT.value):
            return
        ref = self._require_ref()
        options = self._require_options()
        wait = options.provider_wait_seconds
        while True:
            summary: PaymentCheckSummary = await self._act(
                PaymentCheckActivities.check_payment_findings,
                ReconcileRequest(ref=ref, pass_no=pass_no),
                f"Ask the payment provider about {counts[DriftKind.PAYMENT_DRIFT.value]} payment findings",
                timeout=600,
                heartbeat=True,
                attempts=20,
            )
            self._payments = dict(summary.verdicts)
            if not summary.unreachable:
                self._waiting = None
                self._set_phase(Phase.RECONCILING)
                return
            self._waiting = (
                f"{summary.unreachable} payment sessions unconfirmed ({summary.unreachable_reason}); "
                f"asking again in {wait}s. Nothing is planned or credited for them until it answers."
            )
            self._set_phase(Phase.WAITING_ON_PROVIDER)
            await workflow.sleep(wait, summary="waiting for the payment provider to answer")
            wait = min(wait * 2, MAX_PROVIDER_WAIT_SECONDS)
