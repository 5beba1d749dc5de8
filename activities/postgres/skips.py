"""Why an approved action was not applied: already done by the platform, changed since planning, or gone.

Read in the apply's own transaction, right after the effect's re-check refused to write, so the reason
describes exactly the state the re-check saw. One query per action kind, whatever the batch's size.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg

from activities.postgres.drift_sql import CLOSE_COST, OPEN_STATUS_VALUES
from contracts.models import ActionKind, ApplyOutcome, format_money


class Skip(NamedTuple):
    """An action's audited outcome when nothing was written, and its ``after`` document."""

    outcome: ApplyOutcome
    reason: str
    detail: dict[str, Any]

    def document(self) -> str:
        """The audit row's ``after``: the reason first (as ``skipped_provider`` rows carry it), then the facts."""
        return json.dumps({"skipped": self.reason, **self.detail}, default=str)


def _when(at: datetime | str | None) -> str:
    if isinstance(at, str):
        at = datetime.fromisoformat(at)
    return "an unknown time" if at is None else at.strftime("%Y-%m-%d %H:%M:%S UTC")


def _entry(doc: dict[str, Any], currency: str) -> str:
    """A ledger entry as an auditor names it: who wrote it, which, how much, when."""
    return (
        f"{doc['actor']}: ledger entry {doc['id']}, {format_money(doc['amount_minor'], currency)}"
        f" at {_when(doc['created_at'])}"
    )


def _gone(action: asyncpg.Record, what: str) -> Skip:
    return Skip(ApplyOutcome.SKIPPED_GONE, f"{what} {action['entity_id']} no longer exists", {})


def _changed(field: str, planned: Any, now: Any, reason: str) -> Skip:
    return Skip(ApplyOutcome.SKIPPED_STALE, reason, {"changed": {field: {"planned": planned, "now": now}}})


def _money_changed(field: str, what: str, planned: int, row: asyncpg.Record, done: str) -> Skip:
    """An amount that changed since planning: neither the planned nor the new one is written."""
    now, money = row[field], row["currency"]
    return _changed(
        field,
        planned,
        now,
        f"{what} changed since planning: {format_money(planned, money)} -> {format_money(now, money)};"
        f" {done} at neither",
    )


_USAGE = f"""SELECT u.id::text AS id, u.end_time, u.accrued_cost_minor, u.allocation_id, a.status AS alloc_status,
                    CASE WHEN u.end_time IS NULL THEN {CLOSE_COST} END AS close_cost, o.currency,
                    (SELECT to_jsonb(l) FROM billing.ledger_entries l
                     WHERE l.usage_record_id = u.id AND l.kind = 'usage_debit' AND l.reversed_by_entry_id IS NULL) AS debit
             FROM billing.usage_records u JOIN billing.allocations a ON a.id = u.allocation_id
             JOIN billing.orgs o ON o.id = u.org_id WHERE u.id = ANY($1::bigint[])"""

_ALLOCATION = """SELECT a.id, a.status,
                        (SELECT to_jsonb(u) FROM billing.usage_records u
                         WHERE u.allocation_id = a.id AND u.end_time IS NULL LIMIT 1) AS open_usage
                 FROM billing.allocations a WHERE a.id = ANY($1::text[])"""

_SESSION = """SELECT p.id, p.status, p.amount_minor, p.ledger_entry_id, o.currency,
                     (SELECT to_jsonb(l) FROM billing.ledger_entries l
                      WHERE l.payment_session_id = p.id AND l.kind = 'payment_credit' AND l.reversed_by_entry_id IS NULL) AS credit
              FROM billing.payment_sessions p JOIN billing.orgs o ON o.id = p.org_id
              WHERE p.id = ANY($1::text[])"""


def _debit(action: asyncpg.Record, row: asyncpg.Record | None) -> Skip:
    if row is None:
        return _gone(action, "usage record")
    planned = -action["amount_minor"]
    if row["debit"] is not None:
        debit = json.loads(row["debit"])
        note = (
            ""
            if -debit["amount_minor"] == planned
            else f" (planned {format_money(-planned, row['currency'])})"
        )
        return Skip(
            ApplyOutcome.ALREADY_APPLIED,
            f"already debited by {_entry(debit, row['currency'])}{note}",
            {"satisfied_by": debit},
        )
    if row["end_time"] is None:
        return Skip(
            ApplyOutcome.SKIPPED_STALE,
            f"usage record {row['id']} is open again since planning: nothing to debit until it closes",
            {"changed": {"end_time": {"planned": "closed", "now": None}}},
        )
    if row["accrued_cost_minor"] != planned:
        return _money_changed("accrued_cost_minor", "accrued cost", planned, row, "debited")
    return Skip(ApplyOutcome.SKIPPED_STALE, "no longer matches the planned finding", {})


def _close(action: asyncpg.Record, row: asyncpg.Record | None) -> Skip:
    if row is None:
        return _gone(action, "usage record")
    planned = -action["amount_minor"]
    money = row["currency"]
    if row["end_time"] is not None:
        debit = json.loads(row["debit"]) if row["debit"] is not None else None
        billed = (
            f"debited by {_entry(debit, money)}" if debit else "not debited (left as unbilled closed usage)"
        )
        cost = "" if row["accrued_cost_minor"] == planned else f" (planned {format_money(planned, money)})"
        return Skip(
            ApplyOutcome.ALREADY_APPLIED,
            f"already closed at {_when(row['end_time'])} with cost "
            f"{format_money(row['accrued_cost_minor'] or 0, money)}{cost}; {billed}",
            {"satisfied_by": {"end_time": row["end_time"], "accrued_cost_minor": row["accrued_cost_minor"],
                              "debit": debit}},
        )  # fmt: skip
    if row["alloc_status"] in OPEN_STATUS_VALUES:
        return _changed(
            "allocation_status",
            "released",
            row["alloc_status"],
            f"allocation {row['allocation_id']} is {row['alloc_status']} again since planning: "
            "its usage is not an orphan",
        )
    if row["close_cost"] != planned:
        return _money_changed("close_cost", "cost to close", planned, row, "closed")
    return Skip(ApplyOutcome.SKIPPED_STALE, "no longer matches the planned finding", {})


def _open(action: asyncpg.Record, row: asyncpg.Record | None) -> Skip:
    if row is None:
        return _gone(action, "allocation")
    if row["open_usage"] is not None:
        usage = json.loads(row["open_usage"])
        return Skip(
            ApplyOutcome.ALREADY_APPLIED,
            f"already open: usage record {usage['id']} opened by {usage['created_by']}",
            {"satisfied_by": usage},
        )
    return _changed(
        "allocation_status",
        "active",
        row["status"],
        f"allocation {row['id']} is now {row['status']}: no usage record to open",
    )


def _credit_doc(row: asyncpg.Record) -> dict[str, Any] | None:
    return json.loads(row["credit"]) if row["credit"] is not None else None


def _credit(action: asyncpg.Record, row: asyncpg.Record | None) -> Skip:
    if row is None:
        return _gone(action, "payment session")
    credit = _credit_doc(row)
    if credit is not None:
        linked = (
            "; the session is linked to it"
            if row["ledger_entry_id"] == credit["id"]
            else "; the session is not linked to it (left as payment drift)"
        )
        return Skip(
            ApplyOutcome.ALREADY_APPLIED,
            f"already credited by {_entry(credit, row['currency'])}{linked}",
            {"satisfied_by": credit},
        )
    if row["ledger_entry_id"] is not None:
        return Skip(
            ApplyOutcome.ALREADY_APPLIED,
            f"already linked to ledger entry {row['ledger_entry_id']}",
            {"satisfied_by": {"ledger_entry_id": row["ledger_entry_id"]}},
        )
    if row["amount_minor"] != action["amount_minor"]:
        return _money_changed("amount_minor", "session amount", action["amount_minor"], row, "credited")
    return _changed(
        "status", "failed_reconcile", row["status"], f"session status is now {row['status']}: not credited"
    )


def _link(action: asyncpg.Record, row: asyncpg.Record | None) -> Skip:
    if row is None:
        return _gone(action, "payment session")
    credit = _credit_doc(row)
    if row["ledger_entry_id"] is not None:
        by = f" (the credit by {_entry(credit, row['currency'])})" if credit else ""
        return Skip(
            ApplyOutcome.ALREADY_APPLIED,
            f"already linked to ledger entry {row['ledger_entry_id']}{by}",
            {"satisfied_by": credit or {"ledger_entry_id": row["ledger_entry_id"]}},
        )
    return Skip(
        ApplyOutcome.SKIPPED_STALE,
        "its payment credit is no longer in the ledger: nothing to link",
        {"changed": {"credit": {"planned": "present", "now": None}}},
    )


def _mark_failed(action: asyncpg.Record, row: asyncpg.Record | None) -> Skip:
    if row is None:
        return _gone(action, "payment session")
    credit = _credit_doc(row)
    if row["status"] == "failed" and credit is None:
        return Skip(
            ApplyOutcome.ALREADY_APPLIED, "already marked failed", {"satisfied_by": {"status": "failed"}}
        )
    if credit is not None:
        return Skip(
            ApplyOutcome.SKIPPED_STALE,
            f"credited since planning by {_entry(credit, row['currency'])}: not marked failed",
            {"changed": {"credit": {"planned": None, "now": credit}}},
        )
    if row["ledger_entry_id"] is not None:
        return _changed(
            "ledger_entry_id",
            None,
            row["ledger_entry_id"],
            f"linked since planning to ledger entry {row['ledger_entry_id']}: not marked failed",
        )
    return _changed(
        "status",
        "failed_reconcile",
        row["status"],
        f"session status is now {row['status']}: not marked failed",
    )


Explain = Callable[[asyncpg.Record, asyncpg.Record | None], Skip]
# Per kind: the query of the entities' current state (keyed by entity id) and the judgment.
_BY_KIND: dict[ActionKind, tuple[str, bool, Explain]] = {
    ActionKind.POST_USAGE_DEBIT: (_USAGE, True, _debit),
    ActionKind.CLOSE_ORPHAN_USAGE: (_USAGE, True, _close),
    ActionKind.OPEN_USAGE_RECORD: (_ALLOCATION, False, _open),
    ActionKind.CREDIT_PAYMENT: (_SESSION, False, _credit),
    ActionKind.LINK_PAYMENT_CREDIT: (_SESSION, False, _link),
    ActionKind.MARK_PAYMENT_FAILED: (_SESSION, False, _mark_failed),
}


async def explain_skips(conn: asyncpg.Connection, actions: list[asyncpg.Record]) -> dict[int, Skip]:
    """Each not-applied action's outcome and reason, by plan seq."""
    out: dict[int, Skip] = {}
    by_kind: dict[ActionKind, list[asyncpg.Record]] = {}
    for action in actions:
        by_kind.setdefault(ActionKind(action["kind"]), []).append(action)
    for kind, group in by_kind.items():
        query, numeric, judge = _BY_KIND[kind]
        ids = [int(a["entity_id"]) if numeric else a["entity_id"] for a in group]
        rows = {str(r["id"]): r for r in await conn.fetch(query, ids)}
        for action in group:
            out[action["seq"]] = judge(action, rows.get(str(action["entity_id"])))
    return out
