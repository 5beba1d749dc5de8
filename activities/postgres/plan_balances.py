"""Each customer's ledger balance beside a plan: the customers shown first read with the plan, the rest
while it waits for approval (every one before anything is applied)."""

from __future__ import annotations

import asyncio

import asyncpg

# Customers (orgs, and users) whose balance is read in the plan's own transaction: the most money first,
# as `remediate plan` (20) shows them. A platform-wide plan touches nearly every customer, and reading every
# balance sums nearly the whole ledger (1.4 s at 10 M rows): that part waits for approval instead.
READ_WITH_PLAN = 20

ORG_BALANCE = (
    "(SELECT coalesce(sum(l.amount_minor), 0) FROM billing.ledger_entries l WHERE l.org_id = c.org_id)"
)
USER_BALANCE = """(SELECT coalesce(sum(l.amount_minor), 0) FROM billing.ledger_entries l
                   WHERE l.requested_by_user_id = c.user_id AND l.org_id = c.org_id)"""


async def record_customers(conn: asyncpg.Connection, plan_id: str, read_now: int | None) -> None:
    """The plan's money per org and per user, with the balances of the first ``read_now`` of each (the most
    money first; None: all). The others stay NULL until ``read_pending_balances``."""
    await conn.execute(
        f"""INSERT INTO remediation.plan_customers (plan_id, org_id, actions, debits_minor, credits_minor,
               balance_before_minor, currency)
           SELECT $1, c.org_id, c.n, c.debits, c.credits,
                  CASE WHEN $2::int IS NULL OR c.rank <= $2 THEN {ORG_BALANCE} END, o.currency
           FROM (SELECT m.*, row_number() OVER (ORDER BY m.credits - m.debits DESC, m.org_id) AS rank
                 FROM (SELECT org_id, count(*) AS n,
                              coalesce(sum(amount_minor) FILTER (WHERE amount_minor < 0), 0) AS debits,
                              coalesce(sum(amount_minor) FILTER (WHERE amount_minor > 0), 0) AS credits
                       FROM remediation.plan_actions WHERE plan_id = $1 AND org_id <> '*' GROUP BY org_id) m) c
           LEFT JOIN billing.orgs o ON o.id = c.org_id""",
        plan_id,
        read_now,
    )
    await conn.execute(
        f"""INSERT INTO remediation.plan_user_balances (plan_id, org_id, user_id, actions, money_minor,
               balance_before_minor)
           SELECT $1, c.org_id, c.user_id, c.n, c.money,
                  CASE WHEN $2::int IS NULL OR c.rank <= $2 THEN {USER_BALANCE} END
           FROM (SELECT m.*, row_number() OVER (ORDER BY abs(m.money) DESC, m.org_id, m.user_id) AS rank
                 FROM (SELECT org_id, user_id, count(*) AS n, sum(amount_minor) AS money
                       FROM remediation.plan_actions WHERE plan_id = $1 AND org_id <> '*' AND user_id IS NOT NULL
                       GROUP BY org_id, user_id) m) c""",
        plan_id,
        read_now,
    )


async def read_pending_balances(pool: asyncpg.Pool, plan_id: str) -> int:
    """Read the balances the plan left to read (orgs and users at once); idempotent. The number read."""

    async def fill(sql: str) -> int:
        status = await pool.execute(sql, plan_id)  # "UPDATE n"
        return int(status.split()[-1])

    done = await asyncio.gather(
        fill(
            f"""UPDATE remediation.plan_customers c SET balance_before_minor = {ORG_BALANCE}
                WHERE c.plan_id = $1 AND c.balance_before_minor IS NULL"""
        ),
        fill(
            f"""UPDATE remediation.plan_user_balances c SET balance_before_minor = {USER_BALANCE}
                WHERE c.plan_id = $1 AND c.balance_before_minor IS NULL"""
        ),
    )
    return sum(done)
