"""Apply: an approved plan's actions in idempotent, audited batches"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from temporalio import activity

from activities.errors import bad_input, dependency_down, not_found
from activities.heartbeat import heartbeating
from activities.payment_provider import PaymentProvider, ProviderUnreachable, judge
from activities.postgres.audit_rows import PLANNED, write_audit_rows
from activities.postgres.base import CUSTOM_PLANS, PostgresActivities, driver_errors
from activities.postgres.drift_sql import CLOSE_AT, CLOSE_COST, OPEN_STATUSES
from activities.postgres.plan import plan_content_hash
from activities.postgres.reversal_apply import apply_reversals
from activities.postgres.skips import explain_skips
from contracts import names
from contracts.models import (
    API_ACTION_KINDS,
    PROVIDER_CHECKED_KINDS,
    REVERSAL_KINDS,
    ActionKind,
    ApplyOutcome,
    ApplyRequest,
    ApplySummary,
    PaymentVerdict,
    ProviderPayment,
    sql_list,
)

RECHECK_CONCURRENCY = 8  # provider lookups at once while a batch is re-checked

# What the provider must still say at apply time for each provider-checked kind to go ahead.
EXPECTED_VERDICT = {
    ActionKind.CREDIT_PAYMENT: PaymentVerdict.CAPTURED,
    ActionKind.MARK_PAYMENT_FAILED: PaymentVerdict.NOT_CAPTURED,
}


def debit_insert(source: str, actor: str, corr: str) -> str:
    """The one INSERT of usage debits a remediation posts, for a batch or one row.

    ``source`` yields (usage_id, cost, key); a debit is posted only if the usage record is still closed
    at the planned cost and has no debit yet, under its UNIQUE idempotency key (so a crash, a retry or
    the platform's own worker can never debit twice). Returns each posted entry's usage id and row.
    """
    return f"""INSERT INTO billing.ledger_entries (org_id, requested_by_user_id, kind, amount_minor,
                   usage_record_id, idempotency_key, actor, correlation_id)
               SELECT u.org_id, u.requested_by_user_id, 'usage_debit', -u.accrued_cost_minor, u.id, d.key,
                      {actor}, {corr}
               FROM ({source}) d JOIN billing.usage_records u ON u.id = d.usage_id
               WHERE u.end_time IS NOT NULL AND u.accrued_cost_minor = d.cost
                 AND NOT EXISTS (SELECT 1 FROM billing.ledger_entries l
                                 WHERE l.usage_record_id = u.id AND l.kind = 'usage_debit' AND l.reversed_by_entry_id IS NULL)
               ON CONFLICT DO NOTHING
               RETURNING usage_record_id, to_jsonb(billing.ledger_entries.*) AS doc"""


class ApplyActivities(PostgresActivities):
    """Apply."""

    _provider: PaymentProvider | None = None

    @activity.defn(name=names.APPLY_PLAN)
    async def apply_plan(self, request: ApplyRequest) -> ApplySummary:
        """Apply the approved plan's Postgres actions in batches; resumable from the last committed batch."""
        plan = await self._fetchrow(
            "SELECT plan_hash FROM remediation.plans WHERE plan_id = $1", request.plan_id
        )
        if plan is None:
            raise not_found(f"plan {request.plan_id!r} does not exist")
        if plan["plan_hash"] != request.plan_hash:
            raise bad_input(
                f"plan {request.plan_id!r} changed since approval (hash mismatch); re-approval needed"
            )
        with driver_errors():
            rows_hash = await plan_content_hash(self._pool, request.plan_id)
        if rows_hash != request.plan_hash:
            # A row edited after approval (an amount, a revision, a hook): what would run is not what
            # was signed.
            raise bad_input(
                f"plan {request.plan_id!r}: its actions no longer hash to the approved {request.plan_hash[:12]}…"
                f" (now {rows_hash[:12]}…); a row was changed after approval, nothing applied"
            )
        await self._execute(
            "UPDATE remediation.plans SET status = 'applying' WHERE plan_id = $1", request.plan_id
        )
        # The audit rows are committed with the effects, so they say exactly where to resume.
        last_seq = int(
            await self._fetchval(
                "SELECT coalesce(max(seq), 0) FROM remediation.applied_actions WHERE plan_id = $1",
                request.plan_id,
            )
        )
        progress = [last_seq]
        async with heartbeating(lambda: progress[0]):
            last_seq = await self._apply_batches(request, last_seq, progress)
        rows = await self._fetch(
            "SELECT outcome, count(*) AS n FROM remediation.applied_actions WHERE plan_id = $1 GROUP BY outcome",
            request.plan_id,
        )
        counts = {r["outcome"]: int(r["n"]) for r in rows}
        await self._execute(
            "UPDATE remediation.plans SET status = 'applied' WHERE plan_id = $1", request.plan_id
        )
        summary = ApplySummary(
            applied=counts.get("applied", 0),
            skipped_stale=counts.get("skipped_stale", 0),
            already_applied=counts.get("already_applied", 0),
            last_seq=last_seq,
            skipped_provider=counts.get("skipped_provider", 0),
            follow_ups=counts.get("follow_up", 0),
            skipped_gone=counts.get("skipped_gone", 0),
        )
        await self._timeline(
            request.ref.run_id,
            f"apply:{request.plan_id}",
            "remediating",
            summary.describe(),
            {"approvers": ",".join(request.approvers)},
        )
        return summary

    async def _apply_batches(self, request: ApplyRequest, last_seq: int, progress: list[int]) -> int:
        """Apply the plan after ``last_seq`` in committed batches; returns the last applied seq."""
        # A batch is a range of seq (plans number their actions 1..n): one index range scan of a batch
        # whatever the plan's size. "seq > $2 ... LIMIT" let the planner, with no statistics yet for a
        # plan built moments ago, read and sort the whole rest of the plan for every batch (9.5 ms a
        # batch at 100,000 actions, O(n²) in all). Read narrow (seq, kind); whole rows only for the
        # kinds applied one by one.
        window = f"""SELECT seq, kind FROM remediation.plan_actions WHERE plan_id = $1 AND seq > $2 AND seq <= $2 + $3
                     AND kind NOT IN {sql_list(API_ACTION_KINDS)} ORDER BY seq"""
        checked = f"""WITH w AS ({window}) SELECT pa.* FROM w JOIN remediation.plan_actions pa
                      ON pa.plan_id = $1 AND pa.seq = w.seq WHERE w.kind IN {sql_list(PROVIDER_CHECKED_KINDS)}"""
        row = await self._fetchrow(
            f"""SELECT coalesce(max(seq), 0) AS last_planned,
                       bool_or(kind IN {sql_list(PROVIDER_CHECKED_KINDS)}) AS any_checked
                FROM remediation.plan_actions WHERE plan_id = $1 AND seq > $2""",
            request.plan_id,
            last_seq,
        )
        # Most plans have no payment to re-check: they skip the peek (4 ms a batch at 100,000 actions).
        last_planned, any_checked = int(row["last_planned"]), bool(row["any_checked"])
        position = last_seq
        while position < last_planned:
            # The provider is asked before the transaction opens: no row lock waits on its answer.
            peek = (
                await self._fetch(checked, request.plan_id, position, request.batch_size)
                if any_checked
                else []
            )
            refused = await self._provider_refusals(request, peek)
            async with self._transaction() as conn:
                await conn.execute(CUSTOM_PLANS)
                batch = await conn.fetch(window, request.plan_id, position, request.batch_size)
                # Usage debits (the bulk of a worker outage's drift) go in one statement per batch.
                debits = [a["seq"] for a in batch if a["kind"] == ActionKind.POST_USAGE_DEBIT]
                if debits:
                    await self._apply_debits(conn, request, debits)
                rest = [a["seq"] for a in batch if a["kind"] != ActionKind.POST_USAGE_DEBIT]
                actions = (
                    await conn.fetch(
                        f"""SELECT pa.* FROM {PLANNED} pa ORDER BY pa.seq""",
                        request.plan_id,
                        rest,
                    )
                    if rest
                    else []
                )
                # A reversal's inverses and restores, set-based too.
                await apply_reversals(conn, request, [a for a in actions if a["kind"] in REVERSAL_KINDS])
                for action in actions:
                    if action["kind"] in REVERSAL_KINDS:
                        continue
                    if action["kind"] == ActionKind.INVESTIGATE_PAYMENT:
                        await self._audit(
                            conn, request, action, ApplyOutcome.FOLLOW_UP, action["params"], _FOLLOW_UP
                        )
                    elif action["seq"] in refused:
                        before, after = refused[action["seq"]]
                        await self._audit(conn, request, action, ApplyOutcome.SKIPPED_PROVIDER, before, after)
                    else:
                        await self._apply_one(conn, request, action)
            # Committed: the next range (a range of API actions only, applied by the workflow, is empty here).
            position += request.batch_size
            if batch:
                last_seq = batch[-1]["seq"]
            progress[0] = min(position, last_planned)
        return last_seq

    async def _provider_refusals(
        self, request: ApplyRequest, actions: list[asyncpg.Record]
    ) -> dict[int, tuple[Any, Any]]:
        """Ask the provider again for each credit (and failed-marking) of the batch: a refund, a
        dispute or a late capture since approval turns the action into an audited skip."""
        checked = [a for a in actions if a["kind"] in PROVIDER_CHECKED_KINDS]
        if not checked:
            return {}
        if self._provider is None:
            raise bad_input("no payment provider configured: credits cannot be confirmed")
        sessions = {
            r["id"]: r
            for r in await self._fetch(
                """SELECT p.id, p.provider_ref, p.amount_minor, o.currency, to_jsonb(p) AS doc
                   FROM billing.payment_sessions p JOIN billing.orgs o ON o.id = p.org_id
                   WHERE p.id = ANY($1::text[])""",
                [a["entity_id"] for a in checked],
            )
        }
        provider = self._provider
        refs = sorted({s["provider_ref"] for s in sessions.values()})
        gate = asyncio.Semaphore(RECHECK_CONCURRENCY)

        async def lookup(ref: str) -> ProviderPayment:
            async with gate:
                return await provider.payment(ref)

        try:
            payments = dict(zip(refs, await asyncio.gather(*(lookup(r) for r in refs)), strict=True))
        except ProviderUnreachable as exc:
            # Retried by the activity's policy; never applied on the plan's word alone.
            raise dependency_down(
                f"payment provider unreachable at apply ({exc}); nothing credited"
            ) from None
        refused: dict[int, tuple[Any, Any]] = {}
        for action in checked:
            session = sessions.get(action["entity_id"])
            if session is None:
                continue  # gone: the handler's own re-check records it as stale
            payment = payments[session["provider_ref"]]
            verdict, reason = judge(session["amount_minor"], session["currency"], payment)
            if verdict is not EXPECTED_VERDICT[ActionKind(action["kind"])]:
                after = {"skipped": f"provider answer changed since approval: {reason}", "verdict": verdict.value,
                         "provider": payment.model_dump()}  # fmt: skip
                refused[action["seq"]] = (session["doc"], json.dumps(after))
        return refused

    async def _apply_debits(self, conn: asyncpg.Connection, request: ApplyRequest, seqs: list[int]) -> None:
        """Post a batch of usage debits set-based: same re-checks, keys and audit rows as one at a time.

        Posted debits are audited in the same statement; the few the re-check refused are explained
        (already debited, cost changed, gone) and audited after it, in the same transaction.
        """
        refused = await conn.fetch(
            f"""WITH acts AS (
                   SELECT pa.seq, pa.entity_id::bigint AS usage_id, -pa.amount_minor AS cost, pa.idempotency_key AS key
                   FROM {PLANNED} pa),
               before AS (
                   SELECT a.seq, to_jsonb(u) AS doc FROM acts a JOIN billing.usage_records u ON u.id = a.usage_id),
               posted AS ({debit_insert("SELECT usage_id, cost, key FROM acts", "$3", "$4")}),
               audited AS (
                   INSERT INTO remediation.applied_actions (plan_id, seq, idempotency_key, kind, outcome, actor,
                       approvers, workflow_id, correlation_id, before, after)
                   SELECT $1, a.seq, a.key, '{ActionKind.POST_USAGE_DEBIT.value}', '{ApplyOutcome.APPLIED.value}',
                          $5, $6, $7, $4, b.doc, p.doc
                   FROM acts a JOIN before b USING (seq) JOIN posted p ON p.usage_record_id = a.usage_id
                   ON CONFLICT (plan_id, seq) DO NOTHING RETURNING seq)
               SELECT a.seq, coalesce(b.doc, 'null'::jsonb)::text AS before
               FROM acts a LEFT JOIN before b USING (seq)
               WHERE NOT EXISTS (SELECT 1 FROM posted p WHERE p.usage_record_id = a.usage_id)""",
            request.plan_id,
            seqs,
            f"remediation:{request.actor}",
            request.ref.correlation_id,
            request.actor,
            request.approvers,
            request.ref.workflow_id,
        )
        if not refused:
            return
        actions = await conn.fetch(
            f"SELECT pa.* FROM {PLANNED} pa ORDER BY pa.seq",
            request.plan_id,
            [r["seq"] for r in refused],
        )
        skips = await explain_skips(conn, actions)
        before = {r["seq"]: r["before"] for r in refused}
        await write_audit_rows(
            conn,
            request,
            [(a, skips[a["seq"]].outcome, before[a["seq"]], skips[a["seq"]].document()) for a in actions],
        )

    async def _apply_one(
        self, conn: asyncpg.Connection, request: ApplyRequest, action: asyncpg.Record
    ) -> None:
        """Re-check the finding, apply the effect and write the audit row, all in the caller's transaction."""
        try:
            handler = HANDLERS[ActionKind(action["kind"])]
        except (ValueError, KeyError):
            raise bad_input(
                f"plan {request.plan_id!r} action {action['seq']}: unknown kind {action['kind']!r}"
            ) from None
        before, after = await handler(
            conn,
            action["entity_id"],
            action["amount_minor"],
            action["idempotency_key"],
            f"remediation:{request.actor}",
            request.ref.correlation_id,
        )
        if after is not None:
            await self._audit(conn, request, action, ApplyOutcome.APPLIED, before, after)
            return
        skip = (await explain_skips(conn, [action]))[action["seq"]]
        await self._audit(conn, request, action, skip.outcome, before, skip.document())

    async def _audit(
        self,
        conn: asyncpg.Connection,
        request: ApplyRequest,
        action: asyncpg.Record,
        outcome: ApplyOutcome,
        before: Any,
        after: Any,
    ) -> None:
        """The action's audit row, in the transaction of its effect (or of its refusal)."""
        await write_audit_rows(conn, request, [(action, outcome, before, after)])


_FOLLOW_UP = json.dumps({"follow_up": "handed to the payments team; never applied by a remediation"})


# The audited (before, after) of one action; after is None when the re-check found nothing to do.
Effect = tuple[Any, Any]
Handler = Callable[[asyncpg.Connection, str, int, str, str, str], Awaitable[Effect]]


async def post_debit(
    conn: asyncpg.Connection, usage_id: int, cost: int, key: str, actor: str, corr: str
) -> Any:
    """Post one usage debit (``debit_insert`` for a single row); its ledger row, or None when re-checks fail."""
    return await conn.fetchval(
        f"""WITH posted AS ({debit_insert("SELECT $1::bigint AS usage_id, $2::bigint AS cost, $3::text AS key", "$4", "$5")})
            SELECT doc FROM posted""",
        usage_id,
        cost,
        key,
        actor,
        corr,
    )


async def _open_usage_record(
    conn: asyncpg.Connection, entity: str, amount: int, key: str, actor: str, corr: str
) -> Effect:
    """Open the missing usage record of an active allocation (still missing, still open)."""
    before = await conn.fetchval("SELECT to_jsonb(a) FROM billing.allocations a WHERE id = $1", entity)
    after = await conn.fetchval(
        f"""INSERT INTO billing.usage_records (allocation_id, org_id, project_id, requested_by_user_id,
                start_time, last_billed_at, app_instance_id, usage_source, control_plane_component,
                operating_mode, control_plane_scope, runtime_backend, idempotency_key, created_by,
                correlation_id)
            SELECT a.id, a.org_id, a.project_id, a.requested_by_user_id, a.activated_at, a.activated_at,
                   a.app_instance_id, a.usage_source, a.control_plane_component, a.operating_mode,
                   a.control_plane_scope, a.runtime_backend, $2, $3, $4
            FROM billing.allocations a WHERE a.id = $1 AND a.status IN {OPEN_STATUSES}
              AND NOT EXISTS (SELECT 1 FROM billing.usage_records u
                              WHERE u.allocation_id = a.id AND u.end_time IS NULL)
            ON CONFLICT DO NOTHING RETURNING to_jsonb(billing.usage_records.*)""",
        entity,
        key,
        actor,
        corr,
    )
    return before, after


async def _close_orphan_usage(
    conn: asyncpg.Connection, entity: str, amount: int, key: str, actor: str, corr: str
) -> Effect:
    """Close an orphan usage record at its allocation's release, at the planned cost, and debit it.

    Audits exactly what it wrote: the closed record, and the debit posted or why none was (a zero
    cost, or a debit someone else already posted on the open record).
    """
    before = await conn.fetchval("SELECT to_jsonb(u) FROM billing.usage_records u WHERE id = $1", int(entity))
    closed = await conn.fetchval(
        f"""UPDATE billing.usage_records u SET end_time = {CLOSE_AT},
                last_billed_at = {CLOSE_AT}, accrued_cost_minor = $2
            FROM billing.allocations a
            WHERE u.id = $1 AND a.id = u.allocation_id AND u.end_time IS NULL
              AND a.status NOT IN {OPEN_STATUSES} AND {CLOSE_COST} = $2
            RETURNING to_jsonb(u.*)""",
        int(entity),
        -amount,
    )
    if closed is None:
        return before, None
    debit = await post_debit(conn, int(entity), -amount, key, actor, corr) if amount != 0 else None
    after: dict[str, Any] = {
        "usage_record": json.loads(closed),
        "debit": json.loads(debit) if debit else None,
    }
    if amount == 0:
        after["debit_not_posted"] = "zero cost: nothing to debit"
    elif debit is None:
        existing = await conn.fetchrow(
            "SELECT id, actor FROM billing.ledger_entries WHERE usage_record_id = $1 AND kind = 'usage_debit' AND reversed_by_entry_id IS NULL",
            int(entity),
        )
        after["debit_not_posted"] = (
            f"already debited by {existing['actor']}: ledger entry {existing['id']}"
            if existing
            else "the debit's re-check refused it"
        )
    return before, after


async def _post_usage_debit(
    conn: asyncpg.Connection, entity: str, amount: int, key: str, actor: str, corr: str
) -> Effect:
    """Debit a closed usage record that was never billed (one at a time; batches go set-based)."""
    before = await conn.fetchval("SELECT to_jsonb(u) FROM billing.usage_records u WHERE id = $1", int(entity))
    after = await post_debit(conn, int(entity), -amount, key, actor, corr)
    return before, after


async def _credit_payment(
    conn: asyncpg.Connection, entity: str, amount: int, key: str, actor: str, corr: str
) -> Effect:
    """Credit a payment session with no ledger entry and link it (same amount, still unlinked)."""
    after: Any = None
    before = await conn.fetchval("SELECT to_jsonb(p) FROM billing.payment_sessions p WHERE id = $1", entity)
    entry = await conn.fetchval(
        """INSERT INTO billing.ledger_entries (org_id, requested_by_user_id, kind, amount_minor,
               payment_session_id, idempotency_key, actor, correlation_id)
           SELECT p.org_id, p.user_id, 'payment_credit', p.amount_minor, p.id, $3, $4, $5
           FROM billing.payment_sessions p
           WHERE p.id = $1 AND p.amount_minor = $2 AND p.ledger_entry_id IS NULL
             AND p.status IN ('failed_reconcile', 'completed')
             AND NOT EXISTS (SELECT 1 FROM billing.ledger_entries l
                             WHERE l.payment_session_id = p.id AND l.kind = 'payment_credit' AND l.reversed_by_entry_id IS NULL)
           ON CONFLICT DO NOTHING RETURNING id""",
        entity,
        amount,
        key,
        actor,
        corr,
    )
    if entry is not None:
        after = await conn.fetchval(
            """UPDATE billing.payment_sessions SET ledger_entry_id = $2, status = 'completed',
                   completed_at = coalesce(completed_at, now()) WHERE id = $1 RETURNING to_jsonb(payment_sessions.*)""",
            entity,
            entry,
        )
    return before, after


async def _link_payment_credit(
    conn: asyncpg.Connection, entity: str, amount: int, key: str, actor: str, corr: str
) -> Effect:
    """Link a payment session to the credit already in the ledger."""
    before = await conn.fetchval("SELECT to_jsonb(p) FROM billing.payment_sessions p WHERE id = $1", entity)
    after = await conn.fetchval(
        """UPDATE billing.payment_sessions p SET ledger_entry_id = l.id, status = 'completed',
               completed_at = coalesce(p.completed_at, now())
           FROM billing.ledger_entries l
           WHERE p.id = $1 AND p.ledger_entry_id IS NULL AND l.payment_session_id = p.id
             AND l.kind = 'payment_credit' AND l.reversed_by_entry_id IS NULL RETURNING to_jsonb(p.*)""",
        entity,
    )
    return before, after


async def _mark_payment_failed(
    conn: asyncpg.Connection, entity: str, amount: int, key: str, actor: str, corr: str
) -> Effect:
    """Mark a session the provider never captured as failed (still uncredited, still unlinked)."""
    before = await conn.fetchval("SELECT to_jsonb(p) FROM billing.payment_sessions p WHERE id = $1", entity)
    after = await conn.fetchval(
        """UPDATE billing.payment_sessions p SET status = 'failed'
           WHERE p.id = $1 AND p.ledger_entry_id IS NULL AND p.status IN ('failed_reconcile', 'completed')
             AND NOT EXISTS (SELECT 1 FROM billing.ledger_entries l
                             WHERE l.payment_session_id = p.id AND l.kind = 'payment_credit' AND l.reversed_by_entry_id IS NULL)
           RETURNING to_jsonb(p.*)""",
        entity,
    )
    return before, after


# One handler per action kind applied in Postgres; the admin-API kinds are carried out by the workflow.
HANDLERS: dict[ActionKind, Handler] = {
    ActionKind.OPEN_USAGE_RECORD: _open_usage_record,
    ActionKind.CLOSE_ORPHAN_USAGE: _close_orphan_usage,
    ActionKind.POST_USAGE_DEBIT: _post_usage_debit,
    ActionKind.CREDIT_PAYMENT: _credit_payment,
    ActionKind.LINK_PAYMENT_CREDIT: _link_payment_credit,
    ActionKind.MARK_PAYMENT_FAILED: _mark_payment_failed,
}
