"""Plans: findings turned into hashed, ordered plan actions"""

from __future__ import annotations

import json

import asyncpg
from temporalio import activity

from activities.heartbeat import heartbeating
from activities.postgres.base import PostgresActivities, driver_errors
from activities.postgres.plan_balances import READ_WITH_PLAN, read_pending_balances, record_customers
from activities.scope_sql import scope_predicate
from contracts import names
from contracts.models import (
    API_ACTION_KINDS,
    CREDIT_REVOKED,
    REVERSAL_KINDS,
    ActionKind,
    ApiAction,
    PlanBalancesRequest,
    PlanRequest,
    PlanSummary,
    sql_list,
)

# The provider's verdict decides a payment finding's action: only a captured payment of the same amount
# and currency is credited (or linked); never captured is marked failed (unless a credit exists: then
# money already moved for nothing, which a human must look at); anything else, or no verdict, is
# investigated and never applied.
PAYMENT_ACTION = f"""CASE
    WHEN f.kind <> 'payment_drift' THEN NULL
    WHEN f.detail->'provider'->>'verdict' = 'captured' AND f.detail->>'existing_credit_id' IS NULL
      THEN '{ActionKind.CREDIT_PAYMENT.value}'
    WHEN f.detail->'provider'->>'verdict' = 'captured' THEN '{ActionKind.LINK_PAYMENT_CREDIT.value}'
    WHEN f.detail->'provider'->>'verdict' = 'not_captured' AND f.detail->>'existing_credit_id' IS NULL
      THEN '{ActionKind.MARK_PAYMENT_FAILED.value}'
    ELSE '{ActionKind.INVESTIGATE_PAYMENT.value}' END"""


# The text a plan's hash is taken over, one line per action: everything the action will do (its kind,
# entity, amount, idempotency key, the provider's evidence for payments, and for admin-API actions their
# parameters: revision from and to, the hook they call; for a reversal's rows the entry, the row's
# before and after they restore). Approvers sign this hash; apply recomputes it.
PLAN_CANON = f"""string_agg(seq || '|' || kind || '|' || entity_id || '|' || amount_minor || '|' || idempotency_key
    || coalesce('|' || (params->'provider')::text, '')
    || CASE WHEN kind IN {sql_list(API_ACTION_KINDS + REVERSAL_KINDS)} THEN coalesce('|' || params::text, '') ELSE '' END,
    E'\\n' ORDER BY seq)"""


async def plan_content_hash(conn: asyncpg.Connection | asyncpg.Pool, plan_id: str) -> str:
    """The hash of the plan's rows as they are now (equal to the stored hash unless a row changed)."""
    return str(
        await conn.fetchval(
            f"""SELECT encode(sha256(convert_to(coalesce({PLAN_CANON}, ''), 'UTF8')), 'hex')
                FROM remediation.plan_actions WHERE plan_id = $1""",
            plan_id,
        )
    )


ANALYZE_PLANS_FROM = 10_000  # actions: a plan this large refreshes its table's statistics


async def refresh_plan_statistics(conn: asyncpg.Connection, actions: int) -> None:
    """After a large plan, fresh statistics for its table (outside the plan's transaction).

    Without them the planner takes a plan built moments ago for a few hundred rows and reads it whole
    for every apply batch (10 ms a batch at 100,000 actions); autovacuum would get there minutes later.
    """
    if actions >= ANALYZE_PLANS_FROM:
        await conn.execute("ANALYZE remediation.plan_actions")


async def seal_plan(conn: asyncpg.Connection, plan_id: str, read_now: int | None = None) -> None:
    """Hash the plan's rows, total them, and record the money planned per customer (and user) with the
    balance now of all of them, or of the first ``read_now`` (the rest are read by ``read_plan_balances``)."""
    await conn.execute(
        f"""UPDATE remediation.plans p SET
             plan_hash = encode(sha256(convert_to(coalesce(s.canon, ''), 'UTF8')), 'hex'),
             action_count = coalesce(s.n, 0), debit_total_minor = coalesce(s.debits, 0),
             credit_total_minor = coalesce(s.credits, 0), counts_by_kind = coalesce(s.kinds, '{{}}')
           FROM (SELECT {PLAN_CANON} AS canon,
                        count(*) AS n,
                        sum(amount_minor) FILTER (WHERE amount_minor < 0) AS debits,
                        sum(amount_minor) FILTER (WHERE amount_minor > 0) AS credits,
                        (SELECT jsonb_object_agg(kind, c) FROM (SELECT kind, count(*) c
                            FROM remediation.plan_actions WHERE plan_id = $1 GROUP BY kind) k) AS kinds
                 FROM remediation.plan_actions WHERE plan_id = $1) s
           WHERE p.plan_id = $1""",
        plan_id,
    )
    # Predicted = balance + the plan's money; the first customers' balances are read in this transaction.
    await record_customers(conn, plan_id, read_now)


# A plan's row with where its findings came from (the pass's recorded source).
PLAN_WITH_SOURCE = """SELECT p.*, s.description AS findings_from FROM remediation.plans p
                      LEFT JOIN remediation.reconcile_sources s ON s.run_id = p.run_id AND s.pass = p.pass
                      WHERE p.plan_id = $1"""


async def read_plan(conn: asyncpg.Connection, plan_id: str) -> PlanSummary:
    """The stored plan's summary (its admin-API actions listed; the rest stay in Postgres)."""
    plan = await conn.fetchrow(PLAN_WITH_SOURCE, plan_id)
    api_rows = await conn.fetch(
        f"""SELECT seq, kind, org_id, idempotency_key, (params->>'to_revision')::int AS target_revision,
                  (params->>'from_revision')::int AS from_revision, params->>'hook' AS hook
           FROM remediation.plan_actions WHERE plan_id = $1
           AND kind IN {sql_list(API_ACTION_KINDS)} ORDER BY seq""",
        plan_id,
    )
    return PlanSummary(
        plan_id=plan["plan_id"],
        plan_hash=plan["plan_hash"],
        action_count=plan["action_count"],
        debit_total_minor=plan["debit_total_minor"],
        credit_total_minor=plan["credit_total_minor"],
        counts_by_kind=json.loads(plan["counts_by_kind"]),
        api_actions=[
            ApiAction(
                seq=r["seq"],
                kind=r["kind"],
                org_id=r["org_id"],
                idempotency_key=r["idempotency_key"],
                target_revision=r["target_revision"],
                from_revision=r["from_revision"],
                hook=r["hook"],
            )
            for r in api_rows
        ],
        reverses_run_id=plan["reverses_run_id"],
        findings_from=plan["findings_from"] or "",
    )


class PlanActivities(PostgresActivities):
    """Plans."""

    @activity.defn(name=names.BUILD_PLAN)
    async def build_plan(self, request: PlanRequest) -> PlanSummary:
        """Turn a pass's findings into ordered, idempotency-keyed actions and hash them."""
        async with heartbeating(lambda: request.plan_id):
            return await self._build_plan(request)

    @activity.defn(name=names.READ_PLAN_BALANCES)
    async def read_plan_balances(self, request: PlanBalancesRequest) -> None:
        """Read the customers' balances the plan left to read (before anything is applied); idempotent."""
        async with heartbeating(lambda: request.plan_id):
            with driver_errors():
                read = await read_pending_balances(self._pool, request.plan_id)
        if not read:  # a plan with few customers read them all with itself
            return
        await self._timeline(
            request.ref.run_id,
            f"plan-balances:{request.plan_id}",
            "awaiting_approval",
            f"plan {request.plan_id}: the balances of {read} more customers and users read while it waits"
            f" for approval (the first {READ_WITH_PLAN} of each were read with the plan)",
            {"read": read},
        )

    async def _build_plan(self, request: PlanRequest) -> PlanSummary:
        ref = request.ref
        async with self._transaction() as conn:
            existing = await conn.fetchrow(
                "SELECT * FROM remediation.plans WHERE plan_id = $1", request.plan_id
            )
            if existing is None:
                await conn.execute(
                    """INSERT INTO remediation.plans (plan_id, run_id, pass, plan_hash, action_count, debit_total_minor,
                           credit_total_minor, counts_by_kind) VALUES ($1, $2, $3, '', 0, 0, 0, '{}')""",
                    request.plan_id,
                    ref.run_id,
                    request.pass_no,
                )
                await conn.execute(
                    f"""INSERT INTO remediation.plan_actions (plan_id, seq, kind, entity_type, entity_id, org_id, user_id,
                           amount_minor, idempotency_key, params)
                       SELECT $1, row_number() OVER (ORDER BY f.kind, f.entity_id), a.kind, f.entity_type, f.entity_id,
                              f.org_id, f.user_id, a.amount, a.key, f.detail
                       FROM remediation.findings f
                       CROSS JOIN LATERAL (SELECT {PAYMENT_ACTION} AS pay) pk
                       CROSS JOIN LATERAL (SELECT
                         CASE f.kind
                           WHEN 'missing_open_usage' THEN '{ActionKind.OPEN_USAGE_RECORD.value}'
                           WHEN 'orphan_open_usage' THEN '{ActionKind.CLOSE_ORPHAN_USAGE.value}'
                           WHEN 'unbilled_closed_usage' THEN '{ActionKind.POST_USAGE_DEBIT.value}'
                           WHEN 'payment_drift' THEN pk.pay
                           -- A partial refund is not the credit's exact inverse: a human decides.
                           WHEN '{CREDIT_REVOKED}' THEN CASE WHEN f.detail->>'revoked' = 'partial'
                             THEN '{ActionKind.INVESTIGATE_PAYMENT.value}' ELSE '{ActionKind.REVERSE_LEDGER_ENTRY.value}' END
                         END AS kind,
                         CASE f.kind
                           WHEN 'missing_open_usage' THEN 0
                           WHEN '{CREDIT_REVOKED}' THEN CASE WHEN f.detail->>'revoked' = 'partial' THEN 0
                                                             ELSE -f.amount_minor END
                           WHEN 'payment_drift' THEN CASE WHEN pk.pay = '{ActionKind.CREDIT_PAYMENT.value}'
                                                          THEN f.amount_minor ELSE 0 END
                           ELSE -f.amount_minor
                         END AS amount,
                         CASE f.kind
                           WHEN 'missing_open_usage' THEN 'usage-open:' || f.entity_id
                           WHEN 'orphan_open_usage' THEN 'usage-debit:' || f.entity_id
                           WHEN 'unbilled_closed_usage' THEN 'usage-debit:' || f.entity_id
                           WHEN 'payment_drift' THEN CASE pk.pay
                             WHEN '{ActionKind.CREDIT_PAYMENT.value}' THEN 'payment-credit:'
                             WHEN '{ActionKind.LINK_PAYMENT_CREDIT.value}' THEN 'payment-link:'
                             WHEN '{ActionKind.MARK_PAYMENT_FAILED.value}' THEN 'payment-failed:'
                             ELSE 'payment-investigate:' END || f.entity_id
                           WHEN '{CREDIT_REVOKED}' THEN CASE WHEN f.detail->>'revoked' = 'partial'
                             THEN 'payment-investigate:ledger-' ELSE 'reversal:' END || f.entity_id
                         END
                         -- Billed (or credited) once and reversed: the new entry needs a key of its own.
                         || coalesce(':after-reversal-of-' || coalesce(f.detail->>'reversed_debit',
                                                                        f.detail->>'reversed_credit'), '') AS key) a
                       WHERE f.run_id = $2 AND f.pass = $3""",
                    request.plan_id,
                    ref.run_id,
                    request.pass_no,
                )
                next_seq = int(
                    await conn.fetchval(
                        "SELECT coalesce(max(seq), 0) + 1 FROM remediation.plan_actions WHERE plan_id = $1",
                        request.plan_id,
                    )
                )
                next_seq = await self._plan_restriction_clears(conn, request, next_seq)
                if request.restart_worker and request.rollback_worker_to is not None:
                    await conn.execute(
                        f"""INSERT INTO remediation.plan_actions (plan_id, seq, kind, entity_type, entity_id, org_id,
                               amount_minor, idempotency_key, params) VALUES ($1, $2,
                               '{ActionKind.ROLLBACK_BILLING_WORKER.value}', 'worker', 'billing-worker', '*', 0, $3,
                               jsonb_strip_nulls(jsonb_build_object('to_revision', $4::int, 'from_revision', $5::int,
                                                                    'hook', $6::text)))""",
                        request.plan_id,
                        next_seq,
                        f"worker-rollback:{ref.run_id}",
                        request.rollback_worker_to,
                        request.rollback_worker_from,
                        request.worker_hook,
                    )
                elif request.restart_worker:
                    await conn.execute(
                        f"""INSERT INTO remediation.plan_actions (plan_id, seq, kind, entity_type, entity_id, org_id,
                               amount_minor, idempotency_key, params) VALUES ($1, $2, '{ActionKind.RESTART_BILLING_WORKER.value}', 'worker',
                               'billing-worker', '*', 0, $3, jsonb_strip_nulls(jsonb_build_object('hook', $4::text)))""",
                        request.plan_id,
                        next_seq,
                        f"worker-restart:{ref.run_id}",
                        request.worker_hook,
                    )
                await seal_plan(conn, request.plan_id, READ_WITH_PLAN if request.balances_later else None)
            summary = await read_plan(conn, request.plan_id)
            await refresh_plan_statistics(conn, summary.action_count)
        await self._timeline(
            ref.run_id,
            f"plan:{request.plan_id}",
            "reconciling",
            f"plan {summary.plan_id}: {summary.action_count} actions, debits "
            f"{summary.debit_total_minor}, credits {summary.credit_total_minor}",
            {"plan_hash": summary.plan_hash},
        )
        return summary

    async def _plan_restriction_clears(self, conn: asyncpg.Connection, request: PlanRequest, seq: int) -> int:
        """Plan clearing prepaid-depletion restrictions whose org the plan's credits bring back above zero."""
        pred, params = scope_predicate(request.ref.scope, {"org_id": "r.org_id"}, 2)
        rows = await conn.fetch(
            f"""SELECT r.org_id FROM billing.financial_restrictions r
                WHERE r.state = 'restricted' AND r.reason = 'prepaid_balance_depleted' AND {pred}
                  AND (SELECT coalesce(sum(amount_minor), 0) FROM billing.ledger_entries l WHERE l.org_id = r.org_id)
                    + (SELECT coalesce(sum(amount_minor), 0) FROM remediation.plan_actions pa
                       WHERE pa.plan_id = $1 AND pa.org_id = r.org_id) > 0
                ORDER BY r.org_id""",
            request.plan_id,
            *params,
        )
        for row in rows:
            await conn.execute(
                f"""INSERT INTO remediation.plan_actions (plan_id, seq, kind, entity_type, entity_id, org_id,
                       amount_minor, idempotency_key) VALUES ($1, $2, '{ActionKind.CLEAR_FINANCIAL_RESTRICTION.value}', 'org', $3, $3,
                       0, $4)""",
                request.plan_id,
                seq,
                row["org_id"],
                f"restriction-clear:{row['org_id']}:{request.ref.run_id}",
            )
            seq += 1
        return seq
