-- Each plan's totals per org, written with the plan: the approval page lists the customers a plan
-- touches from here, so a plan of 1,000,000 actions opens as fast as one of 10.
CREATE TABLE IF NOT EXISTS remediation.plan_customers (
    plan_id       text NOT NULL REFERENCES remediation.plans (plan_id),
    org_id        text NOT NULL,
    actions       integer NOT NULL,
    debits_minor  bigint NOT NULL,
    credits_minor bigint NOT NULL,
    PRIMARY KEY (plan_id, org_id)
);
CREATE INDEX IF NOT EXISTS plan_customers_money
    ON remediation.plan_customers (plan_id, (credits_minor - debits_minor) DESC);
