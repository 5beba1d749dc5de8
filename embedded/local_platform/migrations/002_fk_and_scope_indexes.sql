-- Indexes a production billing database needs for the same speed (see docs/performance.md).
-- Foreign keys into ledger_entries and usage_records: without them every delete or key update
-- scans the referencing table (the seeder's drift injection took minutes at 100k rows).
CREATE INDEX IF NOT EXISTS payment_sessions_ledger_entry ON billing.payment_sessions (ledger_entry_id);
CREATE INDEX IF NOT EXISTS ledger_usage_record ON billing.ledger_entries (usage_record_id);
-- Scoped orphan/missing checks look only at open usage: keep those rows reachable per scope.
CREATE INDEX IF NOT EXISTS usage_open_user ON billing.usage_records (requested_by_user_id) WHERE end_time IS NULL;
CREATE INDEX IF NOT EXISTS usage_open_project ON billing.usage_records (project_id) WHERE end_time IS NULL;
CREATE INDEX IF NOT EXISTS usage_open_org ON billing.usage_records (org_id) WHERE end_time IS NULL;
