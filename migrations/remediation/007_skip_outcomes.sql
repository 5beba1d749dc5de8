-- A skipped action says why (the sentence is in its audit row's `after.skipped`); the outcome says
-- which of three: already done by the platform (already_applied), changed since planning
-- (skipped_stale), or no longer there (skipped_gone).
ALTER TABLE remediation.applied_actions DROP CONSTRAINT IF EXISTS applied_actions_outcome_check;
ALTER TABLE remediation.applied_actions ADD CONSTRAINT applied_actions_outcome_check
    CHECK (outcome IN ('applied', 'skipped_stale', 'already_applied', 'skipped_gone', 'skipped_provider',
                       'follow_up'));

-- A failed verification names each entity left and the plan action that was meant to fix it.
CREATE INDEX IF NOT EXISTS plan_actions_entity ON remediation.plan_actions (plan_id, entity_id);
