-- Narrow indexes the reconciliation checks read instead of the tables (see docs/performance.md).
-- Each check first finds its drifted keys by an index-only anti-join, then reads just those rows:
-- globally as a merge of two sorted indexes, per scope as a short range scan with index-only probes.
-- On a live production database create them with CREATE INDEX CONCURRENTLY, one at a time.

-- Allocations that should have open usage (missing_open_usage, orphan_open_usage).
CREATE INDEX IF NOT EXISTS allocations_open_id ON billing.allocations (id)
    WHERE status IN ('active', 'releasing', 'release_failed');
CREATE INDEX IF NOT EXISTS allocations_open_org ON billing.allocations (org_id, id)
    WHERE status IN ('active', 'releasing', 'release_failed');
CREATE INDEX IF NOT EXISTS allocations_open_project ON billing.allocations (project_id, id)
    WHERE status IN ('active', 'releasing', 'release_failed');
CREATE INDEX IF NOT EXISTS allocations_open_user ON billing.allocations (requested_by_user_id, id)
    WHERE status IN ('active', 'releasing', 'release_failed');

-- Open usage per scope, with the allocation it meters (replaces the single-column versions of 002).
CREATE INDEX IF NOT EXISTS usage_open_org_alloc ON billing.usage_records (org_id, allocation_id) WHERE end_time IS NULL;
CREATE INDEX IF NOT EXISTS usage_open_project_alloc ON billing.usage_records (project_id, allocation_id) WHERE end_time IS NULL;
CREATE INDEX IF NOT EXISTS usage_open_user_alloc ON billing.usage_records (requested_by_user_id, allocation_id) WHERE end_time IS NULL;
DROP INDEX IF EXISTS billing.usage_open_org;
DROP INDEX IF EXISTS billing.usage_open_project;
DROP INDEX IF EXISTS billing.usage_open_user;

-- Closed usage that must carry a debit (unbilled_closed_usage), anti-joined with ledger_one_debit_per_usage.
CREATE INDEX IF NOT EXISTS usage_billable_id ON billing.usage_records (id)
    WHERE end_time IS NOT NULL AND accrued_cost_minor > 0;
CREATE INDEX IF NOT EXISTS usage_billable_org ON billing.usage_records (org_id, id)
    WHERE end_time IS NOT NULL AND accrued_cost_minor > 0;
CREATE INDEX IF NOT EXISTS usage_billable_project ON billing.usage_records (project_id, id)
    WHERE end_time IS NOT NULL AND accrued_cost_minor > 0;
CREATE INDEX IF NOT EXISTS usage_billable_user ON billing.usage_records (requested_by_user_id, id)
    WHERE end_time IS NOT NULL AND accrued_cost_minor > 0;

-- Debits per org and per user: the scoped unbilled check subtracts them before its exact anti-join.
CREATE INDEX IF NOT EXISTS ledger_debit_org ON billing.ledger_entries (org_id, usage_record_id) WHERE kind = 'usage_debit';
CREATE INDEX IF NOT EXISTS ledger_debit_user ON billing.ledger_entries (requested_by_user_id, usage_record_id) WHERE kind = 'usage_debit';
