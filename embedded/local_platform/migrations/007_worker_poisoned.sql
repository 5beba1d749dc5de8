-- A worker caught in a poison-message loop: it fetches every event, fails on it and NAKs it, so the
-- consumer redelivers forever while nothing is acknowledged (the classic billing-worker failure).
ALTER TABLE billing.worker_control DROP CONSTRAINT IF EXISTS worker_control_mode_check;
ALTER TABLE billing.worker_control ADD CONSTRAINT worker_control_mode_check
    CHECK (mode IN ('running', 'crashed', 'stalled', 'poisoned'));
