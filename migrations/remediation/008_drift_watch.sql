-- The drift watch (issue 26): its configuration and watermark, the keys changed since the last tick,
-- each tick, and each tick's findings.

-- One row per watch (one per schedule): what `remediate watch enable` set, and how far it has read.
CREATE TABLE IF NOT EXISTS remediation.watch_state (
    watch_id        text PRIMARY KEY,
    scope           jsonb NOT NULL DEFAULT '{}',
    every_seconds   integer NOT NULL,
    full_every_seconds integer NOT NULL,
    settle_seconds  integer NOT NULL,
    act_threshold   integer NOT NULL,
    -- Stream sequence of the last event whose keys are stored in watch_keys (the watermark); NULL until
    -- the first tick, which starts from the stream's end (its full pass covers what came before).
    watermark_seq   bigint,
    last_full_at    timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Keys named by events since the watermark, waiting for their tick: checked once settled (older than
-- the settle time and processed by the billing worker), deleted in the transaction that stores the
-- findings of that check.
CREATE TABLE IF NOT EXISTS remediation.watch_keys (
    watch_id    text NOT NULL,
    key_kind    text NOT NULL CHECK (key_kind IN ('allocation', 'payment_session')),
    key         text NOT NULL,
    last_seq    bigint NOT NULL,        -- newest event naming the key
    worker_seq  bigint NOT NULL DEFAULT 0,  -- newest of those the billing worker consumes (provisioning.*)
    last_event_at timestamptz NOT NULL,
    PRIMARY KEY (watch_id, key_kind, key)
);

CREATE TABLE IF NOT EXISTS remediation.watch_ticks (
    tick_id       text PRIMARY KEY,     -- the DriftWatch run's workflow id
    watch_id      text NOT NULL,
    mode          text NOT NULL CHECK (mode IN ('incremental', 'full')),
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    outcome       text CHECK (outcome IN ('ok', 'failed')),
    error         text,
    events_read   integer NOT NULL DEFAULT 0,
    keys_checked  integer NOT NULL DEFAULT 0,
    keys_deferred integer NOT NULL DEFAULT 0,
    deferred_why  text,
    findings      jsonb NOT NULL DEFAULT '{}',   -- by drift kind
    acted         jsonb NOT NULL DEFAULT '[]'    -- remediations started or joined: [{workflow_id, action, scope, findings}]
);
CREATE INDEX IF NOT EXISTS watch_ticks_recent ON remediation.watch_ticks (watch_id, started_at DESC);

CREATE TABLE IF NOT EXISTS remediation.watch_findings (
    tick_id        text NOT NULL REFERENCES remediation.watch_ticks (tick_id),
    kind           text NOT NULL,
    entity_type    text NOT NULL,
    entity_id      text NOT NULL,
    org_id         text NOT NULL,
    project_id     text,
    user_id        text,
    allocation_id  text,
    amount_minor   bigint NOT NULL DEFAULT 0,
    detail         jsonb NOT NULL DEFAULT '{}',
    settle_seconds integer NOT NULL,
    found_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tick_id, kind, entity_id)
);
