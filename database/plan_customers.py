"""Each customer a plan touches: its money, its ledger balance when the plan was built and the balance the
plan will leave (approval page, `remediate plan`, evidence), read from the per-org rows written with it."""

from __future__ import annotations

from typing import Any

import asyncpg

# The most money first: the order the customers and users are shown in, and their balances read in.
ORG_ORDER = "(c.credits_minor - c.debits_minor) DESC, c.org_id"
USER_ORDER = "abs(c.money_minor) DESC, c.org_id, c.user_id"


async def customers(
    conn: asyncpg.Pool | asyncpg.Connection, plan_id: str, limit: int = 100
) -> list[dict[str, Any]]:
    """Orgs the plan touches, the most money first: actions, debits, credits, balance now and predicted.

    Read from ``remediation.plan_customers`` (written with the plan), so the cost does not grow with the
    plan. ``balance_after`` is the balance read before approval plus the plan's money; None while it is being
    read (all but the first customers of a large plan, for a moment) and for plans built before balances
    were recorded.
    """
    rows = await conn.fetch(
        f"""SELECT c.org_id, coalesce(o.name, c.org_id) AS name, coalesce(c.currency, o.currency, '') AS currency,
                  c.actions, c.debits_minor AS debits, c.credits_minor AS credits,
                  c.balance_before_minor AS balance_before,
                  c.balance_before_minor + c.debits_minor + c.credits_minor AS balance_after
           FROM remediation.plan_customers c LEFT JOIN billing.orgs o ON o.id = c.org_id
           WHERE c.plan_id = $1
           ORDER BY {ORG_ORDER} LIMIT $2""",
        plan_id,
        limit,
    )
    return [dict(r) for r in rows]


async def balances_after_apply(conn: asyncpg.Pool | asyncpg.Connection, plan_id: str) -> list[dict[str, Any]]:
    """Per customer (an org, then each of its users): the balance predicted when the plan was built and the
    balance now, and their difference.

    A difference has two possible causes, both named: actions the apply did not carry out (their money,
    ``not_applied``) and entries other writers posted meanwhile (the rest).
    """
    rows = await conn.fetch(
        """SELECT c.org_id, NULL AS user_id, coalesce(c.currency, o.currency, '') AS currency,
                  c.balance_before_minor AS before,
                  c.balance_before_minor + c.debits_minor + c.credits_minor AS predicted,
                  (SELECT coalesce(sum(l.amount_minor), 0) FROM billing.ledger_entries l
                   WHERE l.org_id = c.org_id)::bigint AS actual,
                  (SELECT coalesce(sum(pa.amount_minor), 0) FROM remediation.plan_actions pa
                   LEFT JOIN remediation.applied_actions aa ON aa.plan_id = pa.plan_id AND aa.seq = pa.seq
                   WHERE pa.plan_id = c.plan_id AND pa.org_id = c.org_id
                     AND aa.outcome IS DISTINCT FROM 'applied')::bigint AS not_applied
           FROM remediation.plan_customers c LEFT JOIN billing.orgs o ON o.id = c.org_id
           WHERE c.plan_id = $1 AND c.balance_before_minor IS NOT NULL
           UNION ALL
           SELECT b.org_id, b.user_id, coalesce(o.currency, ''), b.balance_before_minor,
                  b.balance_before_minor + b.money_minor,
                  (SELECT coalesce(sum(l.amount_minor), 0) FROM billing.ledger_entries l
                   WHERE l.requested_by_user_id = b.user_id AND l.org_id = b.org_id)::bigint,
                  (SELECT coalesce(sum(pa.amount_minor), 0) FROM remediation.plan_actions pa
                   LEFT JOIN remediation.applied_actions aa ON aa.plan_id = pa.plan_id AND aa.seq = pa.seq
                   WHERE pa.plan_id = b.plan_id AND pa.org_id = b.org_id AND pa.user_id = b.user_id
                     AND aa.outcome IS DISTINCT FROM 'applied')::bigint
           FROM remediation.plan_user_balances b LEFT JOIN billing.orgs o ON o.id = b.org_id
           WHERE b.plan_id = $1 AND b.balance_before_minor IS NOT NULL
           ORDER BY 1, 2 NULLS FIRST""",
        plan_id,
    )
    found = []
    for r in rows:
        row = dict(r)
        row["difference"] = row["actual"] - row["predicted"]
        row["others"] = row["difference"] + row["not_applied"]
        found.append(row)
    return found


async def users(
    conn: asyncpg.Pool | asyncpg.Connection, plan_id: str, limit: int = 100
) -> list[dict[str, Any]]:
    """Users the plan touches, the most money first: their ledger balance now and after the plan."""
    rows = await conn.fetch(
        f"""SELECT c.org_id, c.user_id, coalesce(o.currency, '') AS currency, c.actions, c.money_minor AS money,
                  c.balance_before_minor AS balance_before, c.balance_before_minor + c.money_minor AS balance_after
           FROM remediation.plan_user_balances c LEFT JOIN billing.orgs o ON o.id = c.org_id
           WHERE c.plan_id = $1 ORDER BY {USER_ORDER} LIMIT $2""",
        plan_id,
        limit,
    )
    return [dict(r) for r in rows]
