-- Where each reconciliation pass's findings came from (issue 29): a full reconciliation, or the drift
-- watch's state (its last full pass plus the keys changed since, checked at the pass). The plan built
-- from the pass names it, with its age; the first call of a split pass decides and the rest follow it.
CREATE TABLE IF NOT EXISTS remediation.reconcile_sources (
    run_id        text NOT NULL REFERENCES remediation.runs (run_id),
    pass          integer NOT NULL,
    source        text NOT NULL CHECK (source IN ('full', 'watch')),
    watch_id      text,
    full_tick_id  text,
    full_started_at timestamptz,      -- the watch's full pass: findings since are re-checked
    keys_checked  integer NOT NULL DEFAULT 0,
    description   text NOT NULL,      -- the sentence the plan, the UI and `remediate plan` show
    decided_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, pass)
);

-- The findings since a full pass are read from the ticks that ended after it began (or still run).
CREATE INDEX IF NOT EXISTS watch_ticks_finished ON remediation.watch_ticks (watch_id, finished_at);
