"""Ask the payment provider about every payment finding; its answer becomes part of the finding.

Touches three systems on purpose, in one place: the findings (Postgres), the provider (its API) and
the webhook worker's log lines (Loki), because one verdict needs all three.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import asyncpg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.errors import dependency_down
from activities.heartbeat import heartbeating
from activities.loki import LokiActivities, line_field
from activities.payment_provider import PaymentProvider, ProviderUnreachable, judge
from activities.postgres.base import PostgresActivities
from activities.postgres.drift_sql import checks as drift_checks
from activities.scope_sql import LEDGER_COLUMNS, scope_predicate
from contracts import names
from contracts.models import (
    CREDIT_RECHECK_DAYS,
    CREDIT_REVOKED,
    DriftKind,
    PaymentCheck,
    PaymentCheckSummary,
    PaymentVerdict,
    ReconcileRequest,
    RunRef,
)

WEBHOOK_QUERY = '{service_name="gpuaas-webhook-worker"} |= "payment_intent.succeeded" | json | __error__=""'
PREFETCH_LIMIT = 2_000  # sessions asked while the run diagnoses; any others are asked at the pass
ANSWER_FRESH_SECONDS = 120  # an answer asked while diagnosing is reused this long, then asked again


class PaymentCheckActivities(PostgresActivities):
    """Provider verdicts for payment findings (bounded concurrency, retries in the provider client)."""

    def __init__(
        self, pool: asyncpg.Pool, provider: PaymentProvider, loki: LokiActivities, concurrency: int = 8
    ) -> None:
        super().__init__(pool)
        self._provider = provider
        self._loki = loki
        self._concurrency = concurrency

    @activity.defn(name=names.CHECK_PAYMENTS)
    async def check_payment_findings(self, request: ReconcileRequest) -> PaymentCheckSummary:
        """Give every unjudged (or unanswered) payment finding of the pass the provider's verdict."""
        rows = await self._fetch(
            """SELECT f.entity_id, p.provider_ref, p.amount_minor, o.currency
               FROM remediation.findings f
               JOIN billing.payment_sessions p ON p.id = f.entity_id
               JOIN billing.orgs o ON o.id = p.org_id
               WHERE f.run_id = $1 AND f.pass = $2 AND f.kind = $3
                 AND coalesce(f.detail->'provider'->>'verdict', 'unreachable') = 'unreachable'
               ORDER BY f.entity_id""",
            request.ref.run_id,
            request.pass_no,
            DriftKind.PAYMENT_DRIFT.value,
        )
        reused = await self._fresh_answers(request.ref.run_id, rows)
        done = [len(reused)]
        async with heartbeating(lambda: done[0]):
            asked = await self._judge_all([r for r in rows if r["entity_id"] not in reused], done)
        checks = reused | asked
        if checks:
            await self._execute(
                """UPDATE remediation.findings f SET detail = f.detail || jsonb_build_object('provider', v.doc::jsonb)
                   FROM unnest($4::text[], $5::text[]) AS v(entity, doc)
                   WHERE f.run_id = $1 AND f.pass = $2 AND f.kind = $3 AND f.entity_id = v.entity""",
                request.ref.run_id,
                request.pass_no,
                DriftKind.PAYMENT_DRIFT.value,
                list(checks),
                [c.model_dump_json() for c in checks.values()],
            )
        summary = await self._summary(request, checks)
        await self._timeline(
            request.ref.run_id,
            f"payments:{request.pass_no}:{summary.checked}:{summary.unreachable}",
            "reconciling",
            f"payment provider checked {len(checks)} payment findings"
            + (f" ({len(reused)} answered while the run diagnosed)" if reused else "")
            + ": "
            + ", ".join(f"{k} {v}" for k, v in sorted(summary.verdicts.items())),
            {
                "verdicts": summary.verdicts,
                "unreachable_reason": summary.unreachable_reason,
                "answered_while_diagnosing": len(reused),
            },
        )
        return summary

    @activity.defn(name=names.PREFETCH_PAYMENTS)
    async def prefetch_provider_answers(self, ref: RunRef) -> int:
        """While the run diagnoses, ask the provider about the scope's payment sessions that look
        unreconciled (the payment check's own SQL); the pass reuses answers younger than
        ``ANSWER_FRESH_SECONDS``. Best effort: stops asking once the provider fails; returns answers kept."""
        check = drift_checks(ref.scope, 1)[DriftKind.PAYMENT_DRIFT]
        rows = await self._fetch(
            f"""SELECT p.id AS entity_id, p.provider_ref, p.amount_minor, o.currency
                FROM billing.payment_sessions p JOIN billing.orgs o ON o.id = p.org_id
                WHERE p.id IN ({check.candidates}) ORDER BY p.id LIMIT {PREFETCH_LIMIT}""",
            *check.params,
        )
        done = [0]
        async with heartbeating(lambda: done[0]):
            answers = await self._judge_all(rows, done, stop_when_unreachable=True)
        kept = {e: c for e, c in answers.items() if c.verdict is not PaymentVerdict.UNREACHABLE}
        if kept:
            await self._execute(
                """INSERT INTO remediation.provider_answers (run_id, entity_id, answer)
                   SELECT $1, v.entity, v.doc::jsonb FROM unnest($2::text[], $3::text[]) AS v(entity, doc)
                   ON CONFLICT (run_id, entity_id) DO UPDATE SET answer = excluded.answer, asked_at = now()""",
                ref.run_id,
                list(kept),
                [c.model_dump_json() for c in kept.values()],
            )
        return len(kept)

    async def _fresh_answers(self, run_id: str, rows: list[asyncpg.Record]) -> dict[str, PaymentCheck]:
        """The answers this run asked while diagnosing that are still fresh and about the payment the
        session names now, judged again against the session as it is now (its amount and currency)."""
        if not rows:
            return {}
        stored = await self._fetch(
            """SELECT entity_id, answer::text AS answer FROM remediation.provider_answers
               WHERE run_id = $1 AND entity_id = ANY($2::text[])
                 AND asked_at > now() - make_interval(secs => $3)""",
            run_id,
            [r["entity_id"] for r in rows],
            float(ANSWER_FRESH_SECONDS),
        )
        sessions = {r["entity_id"]: r for r in rows}
        fresh: dict[str, PaymentCheck] = {}
        for answer in stored:
            check = PaymentCheck.model_validate_json(answer["answer"])
            row = sessions[answer["entity_id"]]
            if check.payment is None or check.payment.ref != row["provider_ref"]:
                continue  # the session names another payment since: ask about that one
            verdict, reason = judge(row["amount_minor"], row["currency"], check.payment)
            fresh[answer["entity_id"]] = check.model_copy(update={"verdict": verdict, "reason": reason})
        return fresh

    @activity.defn(name=names.CHECK_REMEDIATION_CREDITS)
    async def check_remediation_credits(self, request: ReconcileRequest) -> int:
        """Find credits remediations posted in scope that the provider has since refunded or disputed.

        Each becomes a finding of its own (kind ``credit_revoked_at_provider``: the credit, the session,
        the provider's answer); returns how many. Unanswered lookups are retried by the activity.
        """
        pred, params = scope_predicate(request.ref.scope, LEDGER_COLUMNS, 2)
        rows = await self._fetch(
            f"""SELECT l.id, l.amount_minor, l.org_id, l.requested_by_user_id AS user_id, p.id AS session_id,
                       p.provider_ref, o.currency
                FROM billing.ledger_entries l
                JOIN billing.payment_sessions p ON p.id = l.payment_session_id
                JOIN billing.orgs o ON o.id = l.org_id
                WHERE l.kind = 'payment_credit' AND l.reversed_by_entry_id IS NULL AND l.actor LIKE 'remediation:%'
                  AND l.created_at > now() - make_interval(days => $1) AND {pred}
                ORDER BY l.id""",
            CREDIT_RECHECK_DAYS,
            *params,
        )
        gate = asyncio.Semaphore(self._concurrency)

        async def one(row: asyncpg.Record) -> PaymentCheck | None:
            async with gate:
                try:
                    payment = await self._provider.payment(row["provider_ref"])
                except ProviderUnreachable as exc:
                    raise dependency_down(f"payment provider unreachable: {exc}") from None
            if not (payment.disputed or payment.refunded_minor):
                return None
            verdict, reason = judge(row["amount_minor"], row["currency"], payment)
            return PaymentCheck(
                verdict=verdict, reason=f"credited by a remediation, then {reason}", payment=payment
            )

        async with heartbeating(lambda: len(rows)):
            checks = await asyncio.gather(*(one(r) for r in rows))
        revoked = [(r, c) for r, c in zip(rows, checks, strict=True) if c is not None]
        if revoked:
            await self._execute(
                """INSERT INTO remediation.findings (run_id, pass, kind, entity_type, entity_id, org_id, user_id,
                       amount_minor, detail)
                   SELECT $1, $2, $3, 'ledger_entry', v.entry::text, v.org, v.usr, v.amount,
                          jsonb_build_object('session_id', v.session, 'provider', v.doc::jsonb,
                                             'revoked', v.revoked)
                   FROM unnest($4::bigint[], $5::text[], $6::text[], $7::bigint[], $8::text[], $9::text[],
                               $10::text[]) AS v(entry, org, usr, amount, session, doc, revoked)
                   ON CONFLICT DO NOTHING""",
                request.ref.run_id,
                request.pass_no,
                CREDIT_REVOKED,
                [r["id"] for r, _ in revoked],
                [r["org_id"] for r, _ in revoked],
                [r["user_id"] for r, _ in revoked],
                [r["amount_minor"] for r, _ in revoked],
                [r["session_id"] for r, _ in revoked],
                [c.model_dump_json() for _, c in revoked],
                [_revoked(c) for _, c in revoked],
            )
            await self._timeline(
                request.ref.run_id,
                f"revoked-credits:{request.pass_no}",
                "reconciling",
                f"{len(revoked)} credits posted by remediations were since refunded or disputed at the provider:"
                " each disputed or fully refunded one is planned as the reversal of that credit; a partly"
                " refunded one goes to the payments team (its exact inverse would take back too much)",
                {"entries": [r["id"] for r, _ in revoked]},
            )
        return len(revoked)

    async def _judge_all(
        self, rows: list[asyncpg.Record], done: list[int], *, stop_when_unreachable: bool = False
    ) -> dict[str, PaymentCheck]:
        """Look every payment up (at most ``concurrency`` at once) and, beside the lookups, find where each
        succeeded one's webhook went. With ``stop_when_unreachable``, lookups not yet begun when one
        fails are not asked."""
        if not rows:
            return {}
        gate = asyncio.Semaphore(self._concurrency)
        failed: list[str] = []
        # Only a succeeded intent has a success event: events are paged while a payment the lookups found
        # succeeded has none yet (paging for the others would read every event the provider keeps).
        succeeded: set[str] = set()
        looked_up = asyncio.Condition()
        finished = False

        async def wanted(found: set[str]) -> bool:
            async with looked_up:
                await looked_up.wait_for(lambda: finished or not succeeded <= found)
                return not succeeded <= found

        async def one(row: asyncpg.Record) -> PaymentCheck:
            async with gate:
                if failed and stop_when_unreachable:
                    return PaymentCheck(verdict=PaymentVerdict.UNREACHABLE, reason=failed[0])
                try:
                    payment = await self._provider.payment(row["provider_ref"])
                except ProviderUnreachable as exc:
                    failed.append(str(exc))
                    return PaymentCheck(verdict=PaymentVerdict.UNREACHABLE, reason=str(exc))
                finally:
                    done[0] += 1
            if payment.found and payment.status == "succeeded":
                async with looked_up:
                    succeeded.add(payment.ref)
                    looked_up.notify_all()
            verdict, reason = judge(row["amount_minor"], row["currency"], payment)
            return PaymentCheck(verdict=verdict, reason=reason, payment=payment)

        async def lookups() -> list[PaymentCheck]:
            nonlocal finished
            try:
                return await asyncio.gather(*(one(r) for r in rows))
            finally:
                async with looked_up:
                    finished = True
                    looked_up.notify_all()

        results, webhook = await asyncio.gather(
            lookups(), self._webhook_status({r["provider_ref"] for r in rows}, wanted)
        )
        checks = {r["entity_id"]: c for r, c in zip(rows, results, strict=True)}
        if not any(c.payment and c.payment.found for c in checks.values()):
            return checks
        return {
            entity: c.model_copy(update={"webhook": webhook(c.payment.ref)}) if c.payment else c
            for entity, c in checks.items()
        }

    async def _webhook_status(
        self, refs: set[str], wanted: Callable[[set[str]], Awaitable[bool]]
    ) -> Callable[[str], str]:
        """A function: payment ref -> whether its success event reached the platform's webhook worker."""
        events: dict[str, str] = {}
        events_error: str | None = None
        received: set[str | None] = set()
        loki_error: str | None = None

        async def provider_events() -> None:
            nonlocal events, events_error
            try:
                events = await self._provider.succeeded_events(refs, wanted)
            except ProviderUnreachable as exc:
                events_error = str(exc)

        async def webhook_lines() -> None:
            nonlocal received, loki_error
            try:
                now = time.time_ns()
                entries, _ = await self._loki.query_range(WEBHOOK_QUERY, now - self._loki.lookback_ns, now)
                received = {line_field(line, "payment_intent") for _, _, line in entries}
            except ApplicationError as exc:  # Loki down or answering garbage: the webhook is unknown
                loki_error = str(exc)

        await asyncio.gather(provider_events(), webhook_lines())

        def status(ref: str) -> str:
            if ref in received:
                return f"received, not applied (webhook worker logged {ref})"
            if loki_error is not None:
                return f"unknown (Loki: {loki_error})"
            if ref in events:
                return f"never received (provider event {events[ref]}, no webhook worker line)"
            if events_error is not None:
                return f"unknown (provider events: {events_error})"
            return "no success event at the provider"

        return status

    async def _summary(
        self, request: ReconcileRequest, checks: dict[str, PaymentCheck]
    ) -> PaymentCheckSummary:
        rows = await self._fetch(
            """SELECT coalesce(detail->'provider'->>'verdict', 'unchecked') AS verdict, count(*) AS n
               FROM remediation.findings WHERE run_id = $1 AND pass = $2 AND kind = $3 GROUP BY 1""",
            request.ref.run_id,
            request.pass_no,
            DriftKind.PAYMENT_DRIFT.value,
        )
        reasons = [c.reason for c in checks.values() if c.verdict is PaymentVerdict.UNREACHABLE]
        return PaymentCheckSummary(
            checked=len(checks),
            verdicts={r["verdict"]: int(r["n"]) for r in rows},
            unreachable_reason=reasons[0] if reasons else None,
        )


def _revoked(check: PaymentCheck) -> str:
    """``full`` (disputed, or refunded in full: the credit's exact inverse is owed) or ``partial``."""
    payment = check.payment
    if payment is None or payment.disputed or payment.refunded_minor >= payment.captured_minor:
        return "full"
    return "partial"
