"""Reversals: the exact inverse of what one run applied, planned from its audit rows and verified after apply."""

from __future__ import annotations

import json

from temporalio import activity

from activities.errors import bad_input, not_found
from activities.heartbeat import heartbeating
from activities.postgres.base import PostgresActivities
from activities.postgres.plan import read_plan, refresh_plan_statistics, seal_plan
from activities.scope_sql import scope_predicate
from contracts import names
from contracts.models import (
    API_ACTION_KINDS,
    ActionKind,
    ApplyOutcome,
    Criterion,
    PlanSummary,
    ReversalPlanRequest,
    ReversalVerifyRequest,
    sql_list,
)

# Where each audited action happened, for a reversal scoped within the run (usage docs carry project and
# allocation; a payment session has org and user only).
WHERE_COLUMNS = {"org_id": "w.org_id", "project_id": "w.project_id", "user_id": "w.user_id",
                 "allocation_id": "w.allocation_id"}  # fmt: skip
PAYMENT_KINDS = sql_list(
    (ActionKind.CREDIT_PAYMENT, ActionKind.LINK_PAYMENT_CREDIT, ActionKind.MARK_PAYMENT_FAILED)
)
ROW_KINDS = sql_list(
    (
        ActionKind.OPEN_USAGE_RECORD,
        ActionKind.CLOSE_ORPHAN_USAGE,
        ActionKind.CREDIT_PAYMENT,
        ActionKind.LINK_PAYMENT_CREDIT,
        ActionKind.MARK_PAYMENT_FAILED,
    )
)
NOT_REVERSIBLE_WHY = {
    ActionKind.CLEAR_FINANCIAL_RESTRICTION: "restriction cleared through the admin API: the platform restricts"
    " the org again if its balance falls to zero; not reversed by a remediation",
    ActionKind.RESTART_BILLING_WORKER: "billing worker restart (admin API): not reversible",
    ActionKind.ROLLBACK_BILLING_WORKER: "billing worker rollback (admin API): not reversible; roll forward"
    " through the platform's deployment process",
}
RESTORED_OK = sql_list((ApplyOutcome.APPLIED, ApplyOutcome.ALREADY_APPLIED))


def _reversal_rows_sql(pred: str) -> str:
    """INSERT of a reversal's plan rows: per audited action, its entry's inverse, its row restore, or a note."""
    original = "jsonb_build_object('plan_id', p.plan_id, 'seq', p.seq, 'kind', p.kind)"
    return f"""
        WITH orig AS MATERIALIZED (
            SELECT aa.plan_id, aa.seq, aa.kind, aa.before, aa.after, pa.org_id, pa.user_id, pa.entity_id,
                   pa.entity_type, coalesce(aa.after->'usage_record', aa.after) AS doc
            FROM remediation.plans pl
            JOIN remediation.applied_actions aa ON aa.plan_id = pl.plan_id
            JOIN remediation.plan_actions pa ON pa.plan_id = aa.plan_id AND pa.seq = aa.seq
            WHERE pl.run_id = $2 AND aa.outcome = '{ApplyOutcome.APPLIED.value}'),
        w AS (
            SELECT o.*, coalesce(o.doc->>'project_id', o.before->>'project_id') AS project_id,
                   CASE WHEN o.kind = '{ActionKind.OPEN_USAGE_RECORD.value}' THEN o.entity_id
                        ELSE coalesce(o.doc->>'allocation_id', o.before->>'allocation_id') END AS allocation_id
            FROM orig o),
        p AS MATERIALIZED (SELECT * FROM w WHERE {pred}),
        -- Rows an earlier reversal of this same run already put back (read by plan id, never scanned).
        restored AS (
            SELECT aa.idempotency_key FROM remediation.reversals v
            JOIN remediation.plans rp ON rp.run_id = v.run_id
            JOIN remediation.applied_actions aa ON aa.plan_id = rp.plan_id
            WHERE v.original_run_id = $2 AND aa.kind = '{ActionKind.RESTORE_ROW.value}'
              AND aa.outcome IN {RESTORED_OK}),
        effects AS (
            SELECT p.plan_id AS oplan, p.seq AS oseq, 1 AS step, '{ActionKind.REVERSE_LEDGER_ENTRY.value}' AS kind,
                   'ledger_entry' AS entity_type, l.id::text AS entity_id, l.org_id, l.requested_by_user_id AS user_id,
                   -l.amount_minor AS amount, 'reversal:' || l.id AS key,
                   jsonb_build_object('original', {original}, 'entry_kind', l.kind,
                                      'entry_amount_minor', l.amount_minor) AS params
            FROM p CROSS JOIN LATERAL (SELECT CASE p.kind
                     WHEN '{ActionKind.POST_USAGE_DEBIT.value}' THEN (p.after->>'id')::bigint
                     WHEN '{ActionKind.CLOSE_ORPHAN_USAGE.value}' THEN (p.after->'debit'->>'id')::bigint
                     WHEN '{ActionKind.CREDIT_PAYMENT.value}' THEN (p.after->>'ledger_entry_id')::bigint END AS id) e
            JOIN billing.ledger_entries l ON l.id = e.id
            WHERE l.reversed_by_entry_id IS NULL
            UNION ALL
            SELECT p.plan_id, p.seq, 2, '{ActionKind.RESTORE_ROW.value}',
                   CASE WHEN p.kind IN {PAYMENT_KINDS} THEN 'payment_session' ELSE 'usage_record' END,
                   CASE WHEN p.kind = '{ActionKind.OPEN_USAGE_RECORD.value}' THEN p.doc->>'id' ELSE p.entity_id END,
                   p.org_id, p.user_id, 0, 'restore:' || p.plan_id || ':' || p.seq,
                   jsonb_build_object('original', {original}, 'after', p.doc,
                       'before', CASE WHEN p.kind = '{ActionKind.OPEN_USAGE_RECORD.value}' THEN 'null'::jsonb
                                      ELSE p.before END)
            FROM p WHERE p.kind IN {ROW_KINDS}
              AND ('restore:' || p.plan_id || ':' || p.seq) NOT IN (SELECT idempotency_key FROM restored)
            UNION ALL
            SELECT p.plan_id, p.seq, 3, '{ActionKind.NOT_REVERSIBLE.value}', p.entity_type, p.entity_id, p.org_id,
                   p.user_id, 0, 'not-reversible:' || p.plan_id || ':' || p.seq,
                   jsonb_build_object('original', {original}, 'why', $3::jsonb->>p.kind)
            FROM p WHERE p.kind IN {sql_list(API_ACTION_KINDS)})
        INSERT INTO remediation.plan_actions (plan_id, seq, kind, entity_type, entity_id, org_id, user_id,
            amount_minor, idempotency_key, params)
        SELECT $1, row_number() OVER (ORDER BY oplan, oseq, step), kind, entity_type, entity_id, org_id, user_id,
               amount, key, params
        FROM effects"""


class ReversalActivities(PostgresActivities):
    """Reversals."""

    @activity.defn(name=names.BUILD_REVERSAL_PLAN)
    async def build_reversal_plan(self, request: ReversalPlanRequest) -> PlanSummary:
        """Plan the exact inverse of what the target run applied (within this run's scope), hashed like any plan."""
        async with heartbeating(lambda: request.plan_id):
            return await self._build(request)

    async def _build(self, request: ReversalPlanRequest) -> PlanSummary:
        ref, target = request.ref, request.target
        async with self._transaction() as conn:
            original = await conn.fetchrow(
                "SELECT workflow_id, trigger, dry_run, ended_at FROM remediation.runs WHERE run_id = $1",
                target.run_id,
            )
            if original is None or original["workflow_id"] != target.workflow_id:
                raise not_found(f"no run {target.run_id!r} of remediation {target.workflow_id!r} to reverse")
            if original["trigger"] == "reversal":
                raise bad_input(f"run {target.run_id!r} is itself a reversal: start a remediation instead")
            if original["ended_at"] is None:
                raise bad_input(
                    f"run {target.run_id!r} is still running: wait for it to end, or abort it first"
                )
            await conn.execute(
                """INSERT INTO remediation.reversals (run_id, workflow_id, original_run_id, original_workflow_id,
                       scope, reason, requested_by)
                   SELECT $1, $2, $3, $4, $5, $6, r.requested_by FROM remediation.runs r WHERE r.run_id = $1
                   ON CONFLICT (run_id) DO NOTHING""",
                ref.run_id,
                ref.workflow_id,
                target.run_id,
                target.workflow_id,
                ref.scope.model_dump_json(),
                target.reason,
            )
            if (
                await conn.fetchval("SELECT 1 FROM remediation.plans WHERE plan_id = $1", request.plan_id)
                is None
            ):
                await conn.execute(
                    """INSERT INTO remediation.plans (plan_id, run_id, pass, plan_hash, action_count, debit_total_minor,
                           credit_total_minor, counts_by_kind, reverses_run_id)
                       VALUES ($1, $2, 0, '', 0, 0, 0, '{}', $3)""",
                    request.plan_id,
                    ref.run_id,
                    target.run_id,
                )
                pred, params = scope_predicate(ref.scope, WHERE_COLUMNS, 4)
                why = json.dumps({kind.value: text for kind, text in NOT_REVERSIBLE_WHY.items()})
                await conn.execute(_reversal_rows_sql(pred), request.plan_id, target.run_id, why, *params)
                await seal_plan(conn, request.plan_id)
            summary = await read_plan(conn, request.plan_id)
            await refresh_plan_statistics(conn, summary.action_count)
        await self._timeline(
            ref.run_id,
            f"plan:{request.plan_id}",
            "reconciling",
            f"reversal plan {summary.plan_id} of run {target.run_id} ({target.workflow_id}):"
            f" {summary.action_count} actions, debits {summary.debit_total_minor},"
            f" credits {summary.credit_total_minor}; reason: {target.reason}",
            {"plan_hash": summary.plan_hash, "reverses_run_id": target.run_id},
        )
        return summary

    @activity.defn(name=names.VERIFY_REVERSAL)
    async def verify_reversal(self, request: ReversalVerifyRequest) -> Criterion:
        """Every planned entry now has exactly one reversal; every planned row is restored or named."""
        row = await self._fetchrow(
            f"""SELECT count(*) FILTER (WHERE pa.kind = '{ActionKind.REVERSE_LEDGER_ENTRY.value}') AS entries,
                       count(*) FILTER (WHERE pa.kind = '{ActionKind.REVERSE_LEDGER_ENTRY.value}' AND EXISTS (
                           SELECT 1 FROM billing.ledger_entries r WHERE r.reverses_entry_id = pa.entity_id::bigint
                       )) AS reversed,
                       count(*) FILTER (WHERE pa.kind = '{ActionKind.RESTORE_ROW.value}') AS rows,
                       count(*) FILTER (WHERE pa.kind = '{ActionKind.RESTORE_ROW.value}'
                                        AND aa.outcome IN {RESTORED_OK}) AS restored,
                       count(*) FILTER (WHERE pa.kind = '{ActionKind.NOT_REVERSIBLE.value}') AS not_reversible,
                       (array_agg(pa.entity_type || ' ' || pa.entity_id || ' (' || coalesce(aa.outcome, 'not applied')
                                  || ')' ORDER BY pa.seq)
                          FILTER (WHERE pa.kind <> '{ActionKind.NOT_REVERSIBLE.value}'
                                  AND aa.outcome IS DISTINCT FROM '{ApplyOutcome.APPLIED.value}'
                                  AND aa.outcome IS DISTINCT FROM '{ApplyOutcome.ALREADY_APPLIED.value}'))[1:20] AS left
                FROM remediation.plan_actions pa
                LEFT JOIN remediation.applied_actions aa ON aa.plan_id = pa.plan_id AND aa.seq = pa.seq
                WHERE pa.plan_id = $1""",
            request.plan_id,
        )
        left = list(row["left"] or [])
        passed = row["reversed"] == row["entries"] and row["restored"] == row["rows"]
        detail = (
            f"{row['reversed']}/{row['entries']} ledger entries reversed (each exactly once),"
            f" {row['restored']}/{row['rows']} rows restored"
            + (
                f"; {row['not_reversible']} not reversible (named in the evidence)"
                if row["not_reversible"]
                else ""
            )
            + (f"; not reverted: {', '.join(left)}" if left else "")
        )
        return Criterion(name="reversal_complete", passed=passed, detail=detail)
