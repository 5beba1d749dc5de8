-- The platform-wide drift and consistency summary: what scoped runs (and a global run's consistency
-- check) read instead of scanning the whole platform. Written by the worker's periodic refresh (drift
-- and consistency) and by every platform-wide reconciliation pass (drift only); readers state its age.
CREATE TABLE IF NOT EXISTS remediation.platform_summaries (
    id              bigserial PRIMARY KEY,
    measured_at     timestamptz NOT NULL DEFAULT now(),
    source          text NOT NULL,            -- 'refresh' or 'reconcile <run_id>'
    drift_by_kind   jsonb NOT NULL,
    orgs_with_drift integer NOT NULL,
    consistency     jsonb,                    -- NULL when the writer did not measure it
    measure_ms      integer NOT NULL
);
CREATE INDEX IF NOT EXISTS platform_summaries_recent ON remediation.platform_summaries (measured_at DESC);
