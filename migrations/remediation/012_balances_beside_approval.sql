-- A large plan reads its first customers' balances with itself and the rest while it waits for approval
-- (issue 29: a platform-wide plan's balances summed most of the ledger on the path to the plan). NULL: not
-- read yet; every balance is read before anything is applied.
ALTER TABLE remediation.plan_user_balances ALTER COLUMN balance_before_minor DROP NOT NULL;
