-- A payment the provider never captured ends as 'failed' (set by an approved remediation), not credited.
ALTER TABLE billing.payment_sessions DROP CONSTRAINT IF EXISTS payment_sessions_status_check;
ALTER TABLE billing.payment_sessions ADD CONSTRAINT payment_sessions_status_check
    CHECK (status IN ('pending', 'completed', 'failed_reconcile', 'failed'));
