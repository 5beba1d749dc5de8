"""The payment step of reconciliation: every payment finding gets the provider's verdict before a plan.

While the provider does not answer, the run waits visibly (phase ``waiting_on_provider`` and the
details say how many sessions and why) and asks again with backoff; it never plans on its own word.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.payment_checks import PaymentCheckActivities
    from activities.postgres import BillingDatabaseActivities
    from activities.watch_events import WatchEventActivities
    from contracts.models import (
        CREDIT_REVOKED,
        DriftKind,
        PaymentCheckSummary,
        Phase,
        ReconcileRequest,
        ReconcileSummary,
    )
    from workflows.activity_calls import activity_cause
    from workflows.remediation_approvals import ApprovalSteps

MAX_PROVIDER_WAIT_SECONDS = 600  # backoff ceiling: history grows by a few events per ask
# Runs started after reversals existed also re-check the credits remediations posted (older histories
# replay without that activity).
REVOKED_CREDITS_PATCH = "reversal-revoked-credits"
# Runs started after this re-check those credits beside the reconciliation, not after it.
OVERLAPPED_CREDITS_PATCH = "overlapped-credits-check"
# Runs started after this bring the drift watch up to the stream's end before planning from it.
WATCH_CATCH_UP_PATCH = "watch-catch-up"
# Runs started after this ask the provider about the scope's unreconciled payments while diagnosing.
PROVIDER_PREFETCH_PATCH = "provider-prefetch"
# Runs started after this check all four kinds in one call on the first pass when the provider was asked
# while diagnosing (nothing is left to overlap): one round trip fewer before the plan.
ONE_RECONCILE_PATCH = "one-reconcile-call"


class PaymentSteps(ApprovalSteps):
    """Provider verdicts for a reconciliation pass's payment findings."""

    async def _reconcile_and_confirm(self, pass_no: int, scope_words: str) -> ReconcileSummary:
        """One reconciliation pass before a plan, every payment finding confirmed at the provider; the
        pass's summary. The provider's lookups run beside the other checks: asked while diagnosing (the
        first pass: then one call checks all four), or else the payment check first, then the rest."""
        ref = self._require_ref()
        from_watch, refused = await self._watch_source(pass_no)

        def reconcile(
            kinds: list[DriftKind] | None, completes: bool, what: str
        ) -> Coroutine[Any, Any, ReconcileSummary]:
            return self._act(
                BillingDatabaseActivities.reconcile,
                ReconcileRequest(
                    ref=ref,
                    pass_no=pass_no,
                    kinds=kinds,
                    completes_pass=completes,
                    from_watch=from_watch,
                    from_watch_refused=refused,
                ),
                f"Reconcile {what} for {scope_words}",
                timeout=600,
                heartbeat=True,
                attempts=20,
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
        if pass_no == 0 and self._prefetch is not None and workflow.patched(ONE_RECONCILE_PATCH):
            beside: asyncio.Task[int] | None = asyncio.create_task(credits())
            summary = await reconcile(None, True, "usage, allocations, the ledger and payment sessions")
            await self._confirm_payments(pass_no, summary.counts)
        else:
            payments = await reconcile([DriftKind.PAYMENT_DRIFT], False, "payment sessions")
            rest = asyncio.create_task(
                reconcile(
                    [k for k in DriftKind if k is not DriftKind.PAYMENT_DRIFT],
                    True,
                    "usage, allocations and the ledger",
                )
            )
            beside = asyncio.create_task(credits()) if workflow.patched(OVERLAPPED_CREDITS_PATCH) else None
            await self._confirm_payments(pass_no, payments.counts)
            summary = await rest
        if beside is not None or workflow.patched(REVOKED_CREDITS_PATCH):
            revoked = await (beside if beside is not None else credits())
            if revoked:
                counts = dict(summary.counts) | {CREDIT_REVOKED: revoked}
                summary = summary.model_copy(update={"counts": counts, "total": summary.total + revoked})
        return summary

    async def _watch_source(self, pass_no: int) -> tuple[bool, str]:
        """Whether this pass may plan from the drift watch's state, and if not, why (shown in the plan).

        Only the platform-wide pass before the first plan (verification reads every row), only while the
        outbox relay is healthy (a change it has not published never reached the stream the watch reads),
        and only once the watch has read the stream up to now (an incident's events are seconds old).
        """
        ref = self._require_ref()
        if pass_no != 0 or not ref.scope.is_global or not self._require_options().plan_from_watch:
            return False, ""
        relay = next((c for c in self._diagnosis if c.check == "outbox_relay"), None)
        if relay is not None and relay.status != "ok":
            return (
                False,
                f"outbox relay {relay.status}: {relay.headline}; changes may not have reached the stream",
            )
        if not workflow.patched(WATCH_CATCH_UP_PATCH):
            return True, ""
        try:
            await self._act(
                WatchEventActivities.catch_up,
                ref,
                "Bring the drift watch up to the stream's end before planning from it",
                timeout=120,
                heartbeat=True,
                attempts=3,
            )
        except ActivityError as err:
            return False, f"the drift watch could not read the stream up to now: {activity_cause(err)}"
        return True, ""

    def _start_provider_prefetch(self) -> None:
        """Ask the provider about the scope's unreconciled payments from the run's start, beside the
        diagnosis: the slowest lookups leave the path to the plan, and the pass reuses answers still fresh."""
        if not workflow.patched(PROVIDER_PREFETCH_PATCH):
            return
        self._prefetch = asyncio.create_task(
            self._act(
                PaymentCheckActivities.prefetch_provider_answers,
                self._require_ref(),
                "Ask the payment provider about unreconciled payment sessions while diagnosing"
                " (answers reused by the plan for two minutes)",
                timeout=600,
                heartbeat=True,
                attempts=2,
            )
        )

    async def _prefetched(self) -> None:
        """Wait for the answers asked while diagnosing; without them the pass asks the provider itself."""
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is not None:
            with contextlib.suppress(ActivityError):
                await prefetch

    async def _confirm_payments(self, pass_no: int, counts: dict[str, int]) -> None:
        """Ask the provider about the pass's payment findings until it has answered for every one."""
        await self._prefetched()
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
