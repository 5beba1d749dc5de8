-- The run's seal: when a run ends, the worker signs the audit chain's final head (every row the run
-- legitimately wrote, its closing timeline entry included). A row chained after the seal was not
-- written by the run: `remediate verify-evidence` names it and fails.
CREATE TABLE IF NOT EXISTS remediation.run_seals (
    run_id       text PRIMARY KEY,
    chain_length bigint NOT NULL,
    chain_head   text NOT NULL,
    sealed_at    timestamptz NOT NULL DEFAULT now(),
    signature    text,          -- base64 Ed25519 over seal_message(); NULL when the worker has no key
    public_key   text
);
