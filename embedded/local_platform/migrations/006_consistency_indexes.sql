-- Partial indexes holding only the rows that break a data-consistency invariant (normally none): the
-- usage-lifecycle and allocation-boundary counts read these instead of scanning the tables, for any
-- scope, at any size. The predicates must stay textually equal to the checks in
-- activities/postgres/consistency_sql.py, or the planner cannot prove the index applies.
-- On a live production database create them with CREATE INDEX CONCURRENTLY.
CREATE INDEX IF NOT EXISTS usage_lifecycle_violations ON billing.usage_records (id)
    WHERE end_time < start_time OR last_billed_at > coalesce(end_time, 'infinity')
       OR (end_time IS NULL AND accrued_cost_minor > 0);
CREATE INDEX IF NOT EXISTS allocations_boundary_violations ON billing.allocations (id)
    WHERE (status = 'released' AND released_at IS NULL)
       OR (status IN ('releasing', 'release_failed') AND releasing_at IS NULL);
