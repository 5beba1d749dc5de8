"""The runbook's four reconciliation checks as set-based SQL: drifted keys by index-only anti-joins, then rows."""

from __future__ import annotations

from typing import Any, NamedTuple

from activities.scope_sql import (
    ALLOCATION_COLUMNS,
    LEDGER_COLUMNS,
    PAYMENT_COLUMNS,
    USAGE_COLUMNS,
    columns_as,
    scope_predicate,
    scope_prefilter,
)
from contracts.models import DriftKind, Scope, sql_list

# An allocation in these states is still running (its usage record should be open).
OPEN_STATUS_VALUES = ("active", "releasing", "release_failed")
OPEN_STATUSES = sql_list(OPEN_STATUS_VALUES)
# Cost of closing a usage record at the allocation's release: the platform's pricing rule in SQL.
# When an orphan's release time was never recorded, close it at the last time it was billed: never
# charge for time nothing proves was used.
CLOSE_AT = "coalesce(a.released_at, a.releasing_at, u.last_billed_at, u.start_time)"
CLOSE_COST = (
    f"((floor(extract(epoch from ({CLOSE_AT} - u.start_time)))::bigint * a.hourly_rate_minor + 3599) / 3600)"
)


# The finding rows' columns, in the order every check's details SELECT produces them.
FINDING_COLUMNS = (
    "kind", "entity_type", "entity_id", "org_id", "project_id", "user_id", "allocation_id", "amount_minor", "detail",
)  # fmt: skip
# A record billed once and reversed is billed again under a new key: its finding names the reversed entry.
REVERSED_DEBIT = """(SELECT max(r.id) FROM billing.ledger_entries r WHERE r.usage_record_id = u.id
                       AND r.kind = 'usage_debit' AND r.reversed_by_entry_id IS NOT NULL)"""
REVERSED_CREDIT = """(SELECT max(r.id) FROM billing.ledger_entries r WHERE r.payment_session_id = p.id
                        AND r.kind = 'payment_credit' AND r.reversed_by_entry_id IS NOT NULL)"""
PAYMENT_DRIFTED = "(p.status = 'failed_reconcile' OR (p.status = 'completed' AND p.ledger_entry_id IS NULL))"
# Each check's exact test for a candidate key ``k``: no match anywhere in the table.
EXACT: dict[DriftKind, str] = {
    DriftKind.MISSING_OPEN_USAGE: (
        "SELECT 1 FROM billing.usage_records u WHERE u.allocation_id = k.id AND u.end_time IS NULL"
    ),
    DriftKind.ORPHAN_OPEN_USAGE: (
        f"SELECT 1 FROM billing.allocations c WHERE c.id = k.allocation_id AND c.status IN {OPEN_STATUSES}"
    ),
    DriftKind.UNBILLED_CLOSED_USAGE: (
        "SELECT 1 FROM billing.ledger_entries l WHERE l.usage_record_id = k.id AND l.kind = 'usage_debit' AND l.reversed_by_entry_id IS NULL"
    ),
}
# Each check's finding rows for the materialised drifted keys (``cand``).
DETAILS: dict[DriftKind, str] = {
    DriftKind.MISSING_OPEN_USAGE: """SELECT 'missing_open_usage', 'allocation', a.id, a.org_id, a.project_id,
                      a.requested_by_user_id, a.id, 0::bigint,
                      jsonb_build_object('status', a.status, 'activated_at', a.activated_at)
               FROM cand CROSS JOIN LATERAL (
                   SELECT * FROM billing.allocations a WHERE a.id = cand.key OFFSET 0) a""",
    DriftKind.ORPHAN_OPEN_USAGE: f"""SELECT 'orphan_open_usage', 'usage_record', u.id::text, u.org_id, u.project_id,
                       u.requested_by_user_id, u.allocation_id, {CLOSE_COST},
                       jsonb_strip_nulls(jsonb_build_object('allocation_status', a.status,
                           'released_at', a.released_at, 'start_time', u.start_time,
                           'reversed_debit', {REVERSED_DEBIT}))
                FROM cand
                CROSS JOIN LATERAL (SELECT * FROM billing.usage_records u
                                    WHERE u.allocation_id = cand.key AND u.end_time IS NULL OFFSET 0) u
                CROSS JOIN LATERAL (SELECT * FROM billing.allocations a WHERE a.id = u.allocation_id OFFSET 0) a""",
    DriftKind.UNBILLED_CLOSED_USAGE: f"""SELECT 'unbilled_closed_usage', 'usage_record', u.id::text, u.org_id, u.project_id,
                      u.requested_by_user_id, u.allocation_id, u.accrued_cost_minor,
                      jsonb_strip_nulls(jsonb_build_object('end_time', u.end_time, 'reversed_debit', {REVERSED_DEBIT}))
               FROM cand CROSS JOIN LATERAL (
                   SELECT * FROM billing.usage_records u WHERE u.id = cand.key OFFSET 0) u""",
    DriftKind.PAYMENT_DRIFT: f"""SELECT 'payment_drift', 'payment_session', p.id, p.org_id, NULL, p.user_id, NULL, p.amount_minor,
                      jsonb_strip_nulls(jsonb_build_object('status', p.status, 'existing_credit_id',
                          (SELECT l.id FROM billing.ledger_entries l
                           WHERE l.payment_session_id = p.id AND l.kind = 'payment_credit' AND l.reversed_by_entry_id IS NULL),
                          'reversed_credit', {REVERSED_CREDIT}))
               FROM cand CROSS JOIN LATERAL (
                   SELECT * FROM billing.payment_sessions p WHERE p.id = cand.key OFFSET 0) p""",
}


class Check(NamedTuple):
    """One runbook check in two steps: the drifted keys first (index-only anti-joins over narrow
    indexes), then the finding rows for just those keys (a lookup per key: ``LATERAL ... OFFSET 0``
    keeps the planner from scanning a whole table to decorate a handful of drifted rows)."""

    candidates: str  # SELECT of one column: the drifted entity's key
    details: str  # SELECT of finding rows FROM cand (the materialised candidates)
    params: list[Any]  # the scope's values (or the keys' arrays), numbered from the caller's ``first``

    def statement(self) -> str:
        """One SELECT producing the finding rows (one snapshot)."""
        return f"WITH cand(key) AS MATERIALIZED ({self.candidates}) {self.details}"


def candidates(scope: Scope, inside: str, outside: str | None, key: str, exact: str) -> str:
    """Drifted keys: ``inside`` keys with no match per ``exact`` (a NOT EXISTS over the whole table).

    Globally that anti-join is a merge of two sorted narrow indexes. For a scope, the keys are first
    narrowed by subtracting ``outside`` (the same scope's matches, a small hashed EXCEPT), then the few
    left are checked exactly, so a match recorded under another scope still counts.
    """
    if scope.is_global or outside is None:
        return f"SELECT {key} FROM ({inside}) k WHERE NOT EXISTS ({exact})"
    # The few keys left are probed one at a time (``LATERAL ... OFFSET 0``: an index lookup each). Left
    # to itself the planner, which cannot tell how few survive the EXCEPT, merge-joins them against the
    # whole table's index (90 ms for a user's six orphans at 200,000 rows).
    return f"""SELECT {key} FROM (({inside}) EXCEPT ({outside})) k
               CROSS JOIN LATERAL (SELECT NOT EXISTS ({exact}) AS drifted OFFSET 0) x WHERE x.drifted"""


def checks(scope: Scope, first: int) -> dict[DriftKind, Check]:
    """The runbook's four reconciliation checks, each as candidates + details, with their params."""
    params = [value for value in scope.model_dump().values() if value]
    open_pred, _ = scope_predicate(scope, columns_as(ALLOCATION_COLUMNS, "c"), first)
    usage_pred, _ = scope_predicate(scope, columns_as(USAGE_COLUMNS, "o"), first)
    pay_pred, pay_params = scope_predicate(scope, PAYMENT_COLUMNS, first)
    ledger_pre = scope_prefilter(scope, columns_as(LEDGER_COLUMNS, "l"), first)
    if ledger_pre is None and scope.project_id:
        # The ledger has no project: its project's org is a cheap superset.
        number = first + [f for f, v in scope.model_dump().items() if v].index("project_id")
        ledger_pre = f"l.org_id = (SELECT pr.org_id FROM billing.projects pr WHERE pr.id = ${number})"
    open_allocations = (
        f"SELECT c.id FROM billing.allocations c WHERE c.status IN {OPEN_STATUSES} AND {open_pred}"
    )
    open_usage = (
        f"SELECT o.allocation_id FROM billing.usage_records o WHERE o.end_time IS NULL AND {usage_pred}"
    )
    billable = f"""SELECT o.id FROM billing.usage_records o
                   WHERE o.end_time IS NOT NULL AND o.accrued_cost_minor > 0 AND {usage_pred}"""
    debits = (
        None
        if ledger_pre is None
        else f"SELECT l.usage_record_id FROM billing.ledger_entries l WHERE l.kind = 'usage_debit' AND l.reversed_by_entry_id IS NULL AND {ledger_pre}"
    )
    return {
        DriftKind.MISSING_OPEN_USAGE: Check(
            candidates(scope, open_allocations, open_usage, "k.id", EXACT[DriftKind.MISSING_OPEN_USAGE]),
            DETAILS[DriftKind.MISSING_OPEN_USAGE],
            params,
        ),
        DriftKind.ORPHAN_OPEN_USAGE: Check(
            candidates(
                scope, open_usage, open_allocations, "k.allocation_id", EXACT[DriftKind.ORPHAN_OPEN_USAGE]
            ),
            DETAILS[DriftKind.ORPHAN_OPEN_USAGE],
            params,
        ),
        DriftKind.UNBILLED_CLOSED_USAGE: Check(
            candidates(scope, billable, debits, "k.id", EXACT[DriftKind.UNBILLED_CLOSED_USAGE]),
            DETAILS[DriftKind.UNBILLED_CLOSED_USAGE],
            params,
        ),
        DriftKind.PAYMENT_DRIFT: Check(
            f"SELECT p.id FROM billing.payment_sessions p WHERE {PAYMENT_DRIFTED} AND {pay_pred}",
            DETAILS[DriftKind.PAYMENT_DRIFT],
            pay_params,
        ),
    }


def keyed_checks(first: int, allocation_ids: list[str], session_ids: list[str]) -> dict[DriftKind, Check]:
    """The four checks for exactly the allocations and payment sessions given: the same semantics as
    ``checks``, the candidates read by key instead of by scope (each check's one array is ``$first``).

    An allocation's key covers its usage records (the orphan and unbilled checks read them by
    allocation).
    """
    allocations = sessions = f"${first}::text[]"
    usage = f"FROM billing.usage_records o WHERE o.allocation_id = ANY({allocations})"
    return {
        DriftKind.MISSING_OPEN_USAGE: Check(
            f"""SELECT k.id FROM (SELECT c.id FROM billing.allocations c
                                  WHERE c.id = ANY({allocations}) AND c.status IN {OPEN_STATUSES}) k
                WHERE NOT EXISTS ({EXACT[DriftKind.MISSING_OPEN_USAGE]})""",
            DETAILS[DriftKind.MISSING_OPEN_USAGE],
            [allocation_ids],
        ),
        DriftKind.ORPHAN_OPEN_USAGE: Check(
            f"""SELECT k.allocation_id FROM (SELECT o.allocation_id {usage} AND o.end_time IS NULL) k
                WHERE NOT EXISTS ({EXACT[DriftKind.ORPHAN_OPEN_USAGE]})""",
            DETAILS[DriftKind.ORPHAN_OPEN_USAGE],
            [allocation_ids],
        ),
        DriftKind.UNBILLED_CLOSED_USAGE: Check(
            f"""SELECT k.id FROM (SELECT o.id {usage} AND o.end_time IS NOT NULL AND o.accrued_cost_minor > 0) k
                WHERE NOT EXISTS ({EXACT[DriftKind.UNBILLED_CLOSED_USAGE]})""",
            DETAILS[DriftKind.UNBILLED_CLOSED_USAGE],
            [allocation_ids],
        ),
        DriftKind.PAYMENT_DRIFT: Check(
            f"SELECT p.id FROM billing.payment_sessions p WHERE p.id = ANY({sessions}) AND {PAYMENT_DRIFTED}",
            DETAILS[DriftKind.PAYMENT_DRIFT],
            [session_ids],
        ),
    }
