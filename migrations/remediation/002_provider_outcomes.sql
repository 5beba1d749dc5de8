-- Apply outcomes decided by the payment provider's answer:
--   skipped_provider  the provider's answer changed between approval and apply: nothing done, reason kept
--   follow_up         an investigate_payment action: never applied, handed to the payments team
ALTER TABLE remediation.applied_actions DROP CONSTRAINT IF EXISTS applied_actions_outcome_check;
ALTER TABLE remediation.applied_actions ADD CONSTRAINT applied_actions_outcome_check
    CHECK (outcome IN ('applied', 'skipped_stale', 'already_applied', 'skipped_provider', 'follow_up'));
