-- A user's dispute counts the user's ledger projection and attribution boundary on the path to its plan
-- (activities/postgres/consistency_sql.py: ledger_projection_users, attribution_boundary). With these two
-- covering indexes neither count reads the usage table's heap, where each of a user's rows sits on a page
-- of its own: for a user with 6,661 usage rows at 1 M rows (EXPLAIN ANALYZE, warm) the ledger projection
-- went 57 -> 12 ms and the attribution count 90 -> 25 ms, and the dispute's time to plan 0.27-0.38 s ->
-- 0.21-0.24 s. They replace the plain indexes of the same keys and names, so every write maintains as
-- many indexes as before (usage_records' updates are not HOT anyway: other indexes cover the columns they
-- change). The price is size: usage_user grows from about 7 MB to about 143 MB per million usage rows
-- (the table itself is about 270 MB). On a live production database build each new one CONCURRENTLY under
-- a new name, then drop the old one and rename.
DROP INDEX IF EXISTS billing.usage_user;
CREATE INDEX usage_user ON billing.usage_records (requested_by_user_id)
    INCLUDE (id, end_time, accrued_cost_minor, allocation_id, app_instance_id, usage_source,
             control_plane_component, operating_mode, control_plane_scope, runtime_backend);
DROP INDEX IF EXISTS billing.ledger_one_debit_per_usage;
CREATE UNIQUE INDEX ledger_one_debit_per_usage ON billing.ledger_entries (usage_record_id) INCLUDE (amount_minor)
    WHERE kind = 'usage_debit' AND reversed_by_entry_id IS NULL;
