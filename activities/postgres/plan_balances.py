"""Each customer's ledger balance beside a plan: the customers shown first read with the plan, the rest
while it waits for approval (every one before anything is applied)."""

from __future__ import annotations

import asyncio

import asyncpg

from database.plan_customers import ORG_ORDER, USER_ORDER

# Customers (orgs, and users) whose balance is read in the plan's own transaction: the most money first,
# as `remediate plan` (20) shows them. A platform-wide plan touches nearly every customer, and reading every
# balance sums nearly the whole ledger (1.4 s at 10 M rows): that part waits for approval instead.
READ_WITH_PLAN = 20

# Balances not read yet, the first ``$2`` of them in the order they are shown (LIMIT NULL: all).
READ_ORGS = f"""UPDATE remediation.plan_customers t SET balance_before_minor =
                  (SELECT coalesce(sum(l.amount_minor), 0) FROM billing.ledger_entries l WHERE l.org_id = t.org_id)
                WHERE t.plan_id = $1 AND t.org_id IN (
                  SELECT c.org_id FROM remediation.plan_customers c
                  WHERE c.plan_id = $1 AND c.balance_before_minor IS NULL ORDER BY {ORG_ORDER} LIMIT $2)"""
READ_USERS = f"""UPDATE remediation.plan_user_balances t SET balance_before_minor =
                   (SELECT coalesce(sum(l.amount_minor), 0) FROM billing.ledger_entries l
                    WHERE l.requested_by_user_id = t.user_id AND l.org_id = t.org_id)
                 WHERE t.plan_id = $1 AND (t.org_id, t.user_id) IN (
                   SELECT c.org_id, c.user_id FROM remediation.plan_user_balances c
                   WHERE c.plan_id = $1 AND c.balance_before_minor IS NULL ORDER BY {USER_ORDER} LIMIT $2)"""


async def record_customers(conn: asyncpg.Connection, plan_id: str, read_now: int | None) -> None:
    """The plan's money per org and per user, with the balances of the first ``read_now`` of each (the most
    money first; None: all). The others stay NULL until ``read_pending_balances``."""
    await conn.execute(
        """INSERT INTO remediation.plan_customers (plan_id, org_id, actions, debits_minor, credits_minor, currency)
           SELECT $1, m.org_id, m.n, m.debits, m.credits, o.currency
           FROM (SELECT org_id, count(*) AS n,
                        coalesce(sum(amount_minor) FILTER (WHERE amount_minor < 0), 0) AS debits,
                        coalesce(sum(amount_minor) FILTER (WHERE amount_minor > 0), 0) AS credits
                 FROM remediation.plan_actions WHERE plan_id = $1 AND org_id <> '*' GROUP BY org_id) m
           LEFT JOIN billing.orgs o ON o.id = m.org_id""",
        plan_id,
    )
    await conn.execute(
        """INSERT INTO remediation.plan_user_balances (plan_id, org_id, user_id, actions, money_minor)
           SELECT $1, org_id, user_id, count(*), sum(amount_minor)
           FROM remediation.plan_actions WHERE plan_id = $1 AND org_id <> '*' AND user_id IS NOT NULL
           GROUP BY org_id, user_id""",
        plan_id,
    )
    await conn.execute(READ_ORGS, plan_id, read_now)
    await conn.execute(READ_USERS, plan_id, read_now)


async def read_pending_balances(pool: asyncpg.Pool, plan_id: str) -> int:
    """Read the balances the plan left to read (orgs and users at once); idempotent. The number read."""

    async def read(sql: str) -> int:
        status = await pool.execute(sql, plan_id, None)  # "UPDATE n"
        return int(status.split()[-1])

    return sum(await asyncio.gather(read(READ_ORGS), read(READ_USERS)))
