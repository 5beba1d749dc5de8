"""A reversal's apply: exact inverse ledger entries and restored rows, set-based, audited in the same statement.

Re-checked in the apply's transaction, like every forward action: an entry is reversed only while it is
unreversed (the ledger's UNIQUE reversal link makes a second reversal impossible, also under crashes and
concurrent runs); a row is put back to its audited ``before`` only while it still holds exactly the run's
``after``; anything else is audited with the reason and nothing is written for it.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import asyncpg

from activities.postgres.audit_rows import PLANNED, AuditRow, write_audit_rows
from contracts.models import ActionKind, ApplyOutcome, ApplyRequest


class Restorable(NamedTuple):
    """A billing table a remediation changes rows of, and how its id is typed."""

    table: str
    id_cast: str


# The only tables a reversal writes rows of (never interpolated from input: entity types map here).
RESTORABLE = {
    "usage_record": Restorable("billing.usage_records", "::bigint"),
    "payment_session": Restorable("billing.payment_sessions", ""),
}
CHANGED = "changed since the remediation; not reverted"
_columns: dict[str, list[str]] = {}


async def _restored_columns(conn: asyncpg.Connection, table: str) -> list[str]:
    """Every column of ``table`` but its id: what a restore puts back."""
    if table not in _columns:
        schema, name = table.split(".")
        rows = await conn.fetch(
            """SELECT column_name FROM information_schema.columns
               WHERE table_schema = $1 AND table_name = $2 AND column_name <> 'id' ORDER BY ordinal_position""",
            schema,
            name,
        )
        _columns[table] = [r["column_name"] for r in rows]
    return _columns[table]


async def apply_reversals(
    conn: asyncpg.Connection, request: ApplyRequest, actions: list[asyncpg.Record]
) -> None:
    """Apply a batch's reversal actions (inverse entries, restores, not-reversible notes) with their audit rows."""
    if not actions:
        return
    by_kind: dict[str, list[asyncpg.Record]] = {}
    for action in actions:
        by_kind.setdefault(action["kind"], []).append(action)
    audits: list[AuditRow] = []
    if entries := by_kind.get(ActionKind.REVERSE_LEDGER_ENTRY):
        audits += await _reverse_entries(conn, request, entries)
    for entity_type, restorable in RESTORABLE.items():
        rows = [a for a in by_kind.get(ActionKind.RESTORE_ROW, []) if a["entity_type"] == entity_type]
        if rows:
            audits += await _restore_rows(conn, request, restorable, rows)
    for action in by_kind.get(ActionKind.NOT_REVERSIBLE, []):
        params = json.loads(action["params"])
        audits.append(
            (action, ApplyOutcome.FOLLOW_UP, params.get("original", {}), {"follow_up": params["why"]})
        )
    await write_audit_rows(conn, request, audits)


async def _reverse_entries(
    conn: asyncpg.Connection, request: ApplyRequest, actions: list[asyncpg.Record]
) -> list[AuditRow]:
    """Post the inverse of each entry (audited in the same statement); returns the refused ones' audit rows."""
    refused = await conn.fetch(
        f"""WITH acts AS (
               SELECT pa.seq, pa.entity_id::bigint AS entry_id, pa.amount_minor AS amount, pa.idempotency_key AS key
               FROM {PLANNED} pa),
           orig AS (
               SELECT a.seq, to_jsonb(l) AS doc FROM acts a JOIN billing.ledger_entries l ON l.id = a.entry_id),
           posted AS (
               INSERT INTO billing.ledger_entries (org_id, requested_by_user_id, kind, amount_minor, usage_record_id,
                   payment_session_id, idempotency_key, actor, correlation_id, reverses_entry_id)
               SELECT l.org_id, l.requested_by_user_id, 'reversal', -l.amount_minor, l.usage_record_id,
                      l.payment_session_id, a.key, $3, $4, l.id
               FROM acts a JOIN billing.ledger_entries l ON l.id = a.entry_id
               WHERE l.reversed_by_entry_id IS NULL AND -l.amount_minor = a.amount
               ON CONFLICT DO NOTHING
               RETURNING reverses_entry_id, to_jsonb(billing.ledger_entries.*) AS doc),
           audited AS (
               INSERT INTO remediation.applied_actions (plan_id, seq, idempotency_key, kind, outcome, actor,
                   approvers, workflow_id, correlation_id, before, after)
               SELECT $1, a.seq, a.key, '{ActionKind.REVERSE_LEDGER_ENTRY.value}', '{ApplyOutcome.APPLIED.value}',
                      $5, $6, $7, $4, o.doc, p.doc
               FROM acts a JOIN orig o USING (seq) JOIN posted p ON p.reverses_entry_id = a.entry_id
               ON CONFLICT (plan_id, seq) DO NOTHING RETURNING seq)
           SELECT a.seq, a.amount, o.doc::text AS doc,
                  (SELECT to_jsonb(r) FROM billing.ledger_entries r WHERE r.reverses_entry_id = a.entry_id)::text
                    AS reversal
           FROM acts a LEFT JOIN orig o USING (seq)
           WHERE NOT EXISTS (SELECT 1 FROM posted p WHERE p.reverses_entry_id = a.entry_id)""",
        request.plan_id,
        [a["seq"] for a in actions],
        f"remediation:{request.actor}",
        request.ref.correlation_id,
        request.actor,
        request.approvers,
        request.ref.workflow_id,
    )
    plan_rows = {a["seq"]: a for a in actions}
    audits: list[AuditRow] = []
    for row in refused:
        action = plan_rows[row["seq"]]
        if row["doc"] is None:
            outcome, why = ApplyOutcome.SKIPPED_GONE, f"ledger entry {action['entity_id']} no longer exists"
        elif row["reversal"] is not None:
            reversal = json.loads(row["reversal"])
            outcome = ApplyOutcome.ALREADY_APPLIED
            why = (
                f"already reversed by {reversal['actor']}: ledger entry {reversal['id']}"
                f" at {reversal['created_at']}"
            )
        else:
            outcome = ApplyOutcome.SKIPPED_STALE
            amount = -json.loads(row["doc"])["amount_minor"]
            why = f"the entry's inverse changed since planning: planned {row['amount']}, now {amount}"
        audits.append((action, outcome, row["doc"] or "null", {"skipped": why, "reversal": row["reversal"]}))
    return audits


async def _restore_rows(
    conn: asyncpg.Connection, request: ApplyRequest, restorable: Restorable, actions: list[asyncpg.Record]
) -> list[AuditRow]:
    """Put rows back to their audited ``before`` (or remove a row the run created) while they still hold
    the run's ``after``; every row is audited: restored, already restored, or changed (a follow-up)."""
    columns = ", ".join(await _restored_columns(conn, restorable.table))
    table, cast = restorable
    done = await conn.fetch(
        f"""WITH acts AS (
               SELECT pa.seq, pa.entity_id{cast} AS id, pa.params->'before' AS before, pa.params->'after' AS after
               FROM {PLANNED} pa),
           restored AS (
               UPDATE {table} t SET ({columns}) = (
                   SELECT {columns} FROM jsonb_populate_record(NULL::{table}, a.before))
               FROM acts a WHERE t.id = a.id AND a.before <> 'null'::jsonb AND to_jsonb(t) = a.after
               RETURNING a.seq, to_jsonb(t.*) AS doc),
           removed AS (
               DELETE FROM {table} t USING acts a
               WHERE t.id = a.id AND a.before = 'null'::jsonb AND to_jsonb(t) = a.after
               RETURNING a.seq, 'null'::jsonb AS doc)
           SELECT seq, doc::text AS doc FROM restored UNION ALL SELECT seq, doc::text FROM removed""",
        request.plan_id,
        [a["seq"] for a in actions],
    )
    written = {r["seq"]: r["doc"] for r in done}
    audits: list[AuditRow] = []
    pending = [a for a in actions if a["seq"] not in written]
    current: dict[int, str | None] = {}
    if pending:
        rows = await conn.fetch(
            f"""SELECT pa.seq, (SELECT to_jsonb(t)::text FROM {table} t WHERE t.id = pa.entity_id{cast}) AS doc
                FROM {PLANNED} pa""",
            request.plan_id,
            [a["seq"] for a in pending],
        )
        current = {r["seq"]: r["doc"] for r in rows}
    for action in actions:
        params = json.loads(action["params"])
        if action["seq"] in written:
            audits.append((action, ApplyOutcome.APPLIED, params["after"], written[action["seq"]]))
            continue
        text = current.get(action["seq"])
        now: Any = json.loads(text) if text else None
        if now == params["before"]:
            audits.append((action, ApplyOutcome.ALREADY_APPLIED, params["after"],
                           {"skipped": "already as before the remediation", "now": now}))  # fmt: skip
        elif now is None:
            audits.append((action, ApplyOutcome.SKIPPED_GONE, params["after"],
                           {"skipped": f"{action['entity_type']} {action['entity_id']} no longer exists"}))  # fmt: skip
        else:
            audits.append((action, ApplyOutcome.FOLLOW_UP, params["after"],
                           {"follow_up": f"{action['entity_type']} {action['entity_id']}: {CHANGED}", "now": now}))  # fmt: skip
    return audits
