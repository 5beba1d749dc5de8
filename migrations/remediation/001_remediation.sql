-- The remediation service's own records: findings, plans, approvals, audit and evidence.
-- Large data lives here; workflow history only carries ids and counts.
CREATE SCHEMA IF NOT EXISTS remediation;

CREATE TABLE remediation.runs (
    run_id         text PRIMARY KEY,
    workflow_id    text NOT NULL,
    correlation_id text NOT NULL,
    trace_id       text,
    trigger        text NOT NULL,
    scope          jsonb NOT NULL,
    requested_by   text NOT NULL,
    dry_run        boolean NOT NULL,
    started_at     timestamptz NOT NULL DEFAULT now(),
    phase          text NOT NULL DEFAULT 'started',
    blast_radius   text,
    outcome        text,
    ended_at       timestamptz
);
CREATE INDEX runs_workflow ON remediation.runs (workflow_id, started_at DESC);

CREATE TABLE remediation.timeline (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id         text NOT NULL REFERENCES remediation.runs (run_id),
    at             timestamptz NOT NULL DEFAULT clock_timestamp(),
    phase          text NOT NULL,
    actor          text NOT NULL,
    message        text NOT NULL,
    detail         jsonb NOT NULL DEFAULT '{}',
    event_key      text UNIQUE  -- retried activities must not write an event twice
);
CREATE INDEX timeline_run ON remediation.timeline (run_id, id);

CREATE TABLE remediation.diagnoses (
    run_id  text NOT NULL REFERENCES remediation.runs (run_id),
    check_name text NOT NULL,
    status  text NOT NULL,
    data    jsonb NOT NULL,
    at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, check_name)
);

CREATE TABLE remediation.findings (
    run_id        text NOT NULL REFERENCES remediation.runs (run_id),
    pass          integer NOT NULL,
    kind          text NOT NULL,
    entity_type   text NOT NULL,
    entity_id     text NOT NULL,
    org_id        text NOT NULL,
    project_id    text,
    user_id       text,
    allocation_id text,
    amount_minor  bigint NOT NULL DEFAULT 0,
    detail        jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, pass, kind, entity_id)
);

CREATE TABLE remediation.plans (
    plan_id            text PRIMARY KEY,
    run_id             text NOT NULL REFERENCES remediation.runs (run_id),
    pass               integer NOT NULL,
    plan_hash          text NOT NULL,
    action_count       integer NOT NULL,
    debit_total_minor  bigint NOT NULL,
    credit_total_minor bigint NOT NULL,
    counts_by_kind     jsonb NOT NULL,
    status             text NOT NULL DEFAULT 'proposed',
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_id, pass)
);

CREATE TABLE remediation.plan_actions (
    plan_id         text NOT NULL REFERENCES remediation.plans (plan_id),
    seq             integer NOT NULL,
    kind            text NOT NULL,
    entity_type     text NOT NULL,
    entity_id       text NOT NULL,
    org_id          text NOT NULL,
    user_id         text,
    amount_minor    bigint NOT NULL,
    idempotency_key text NOT NULL,
    params          jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (plan_id, seq),
    UNIQUE (plan_id, idempotency_key)
);

CREATE TABLE remediation.approvals (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id         text NOT NULL,
    plan_id        text,
    plan_hash      text,
    approver       text NOT NULL,
    decision       text NOT NULL,
    comment        text,
    accepted       boolean NOT NULL,
    refusal_reason text,
    via            text NOT NULL,
    at             timestamptz NOT NULL DEFAULT now(),
    event_key      text UNIQUE
);
CREATE INDEX approvals_run ON remediation.approvals (run_id);

-- One row per applied (or skipped) action, written in the same transaction as the effect.
CREATE TABLE remediation.applied_actions (
    plan_id         text NOT NULL,
    seq             integer NOT NULL,
    idempotency_key text NOT NULL,
    kind            text NOT NULL,
    outcome         text NOT NULL CHECK (outcome IN ('applied', 'skipped_stale', 'already_applied')),
    actor           text NOT NULL,
    approvers       text[] NOT NULL,
    workflow_id     text NOT NULL,
    correlation_id  text NOT NULL,
    before          jsonb NOT NULL,
    after           jsonb NOT NULL,
    applied_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (plan_id, seq)
);

CREATE TABLE remediation.snapshots (
    run_id   text NOT NULL REFERENCES remediation.runs (run_id),
    label    text NOT NULL,
    taken_at timestamptz NOT NULL DEFAULT now(),
    data     jsonb NOT NULL,
    PRIMARY KEY (run_id, label)
);

CREATE TABLE remediation.evidence (
    run_id     text PRIMARY KEY REFERENCES remediation.runs (run_id),
    created_at timestamptz NOT NULL DEFAULT now(),
    document   jsonb NOT NULL
);
