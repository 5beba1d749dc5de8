-- Reversals: a run that takes back (all or a scope of) what an earlier run applied, by exact inverses.
CREATE TABLE IF NOT EXISTS remediation.reversals (
    run_id               text PRIMARY KEY REFERENCES remediation.runs (run_id),
    workflow_id          text NOT NULL,
    original_run_id      text NOT NULL REFERENCES remediation.runs (run_id),
    original_workflow_id text NOT NULL,
    scope                jsonb NOT NULL,
    reason               text NOT NULL,
    requested_by         text NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS reversals_original ON remediation.reversals (original_run_id);
ALTER TABLE remediation.plans ADD COLUMN IF NOT EXISTS reverses_run_id text;

-- Each customer's ledger balance when the plan was built, in the org's currency: the plan leaves
-- balance_before_minor + credits_minor + debits_minor (approvers see both before they sign).
ALTER TABLE remediation.plan_customers
    ADD COLUMN IF NOT EXISTS balance_before_minor bigint,
    ADD COLUMN IF NOT EXISTS currency text;

-- The same per user, where the ledger projection is per user (entries carry requested_by_user_id).
CREATE TABLE IF NOT EXISTS remediation.plan_user_balances (
    plan_id              text NOT NULL REFERENCES remediation.plans (plan_id),
    org_id               text NOT NULL,
    user_id              text NOT NULL,
    actions              integer NOT NULL,
    money_minor          bigint NOT NULL,
    balance_before_minor bigint NOT NULL,
    PRIMARY KEY (plan_id, org_id, user_id)
);
