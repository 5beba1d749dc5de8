-- Provider answers asked while a run diagnoses (issue 29): the pass's payment check reuses those younger
-- than two minutes instead of asking the provider again on the path to the plan. Kept for the audit: each
-- is the answer a verdict was judged from. No reference to remediation.runs: the run asks while it
-- registers, and its answers may be stored first.
CREATE TABLE IF NOT EXISTS remediation.provider_answers (
    run_id    text NOT NULL,
    entity_id text NOT NULL,            -- the payment session
    answer    jsonb NOT NULL,           -- the PaymentCheck: the provider's figures, the webhook's fate
    asked_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, entity_id)
);
