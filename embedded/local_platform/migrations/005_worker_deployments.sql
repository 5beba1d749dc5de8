-- The billing worker's deployment history (current and previous revisions) and the rollback hook's state.
-- `faulty` is the stand-in's switch for a bad revision: while it is current, the worker fails every event.
CREATE TABLE IF NOT EXISTS billing.worker_deployments (
    revision       integer PRIMARY KEY,
    version        text NOT NULL,
    rolled_out_at  timestamptz NOT NULL DEFAULT now(),
    faulty         boolean NOT NULL DEFAULT false,
    rolled_back_at timestamptz
);
INSERT INTO billing.worker_deployments (revision, version, rolled_out_at)
VALUES (1, 'v1.41.0', '2026-10-01T09:00:00Z'), (2, 'v1.42.0', '2026-11-01T09:00:00Z')
ON CONFLICT DO NOTHING;
ALTER TABLE billing.worker_control ADD COLUMN IF NOT EXISTS revision integer NOT NULL DEFAULT 2
    REFERENCES billing.worker_deployments (revision);
