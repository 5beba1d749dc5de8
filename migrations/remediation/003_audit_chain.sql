-- Tamper evidence: every audit row of a run (applied and API actions, approvals and refusals, timeline)
-- is chained, in insertion order, to the one before it: row_hash = sha256(previous row_hash || '|' || the
-- row as JSON). Editing, deleting or reordering a row breaks the chain from that row on; the evidence
-- pack records (and the worker signs) the chain's head. Rows are rendered in UTC so any session verifies.
CREATE TABLE IF NOT EXISTS remediation.audit_chain (
    run_id     text NOT NULL,
    seq        bigint NOT NULL,
    table_name text NOT NULL,
    row_key    jsonb NOT NULL,
    row_hash   text NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE OR REPLACE FUNCTION remediation.audit_row(tbl text, key jsonb) RETURNS text
LANGUAGE plpgsql STABLE SET timezone = 'UTC' AS $$
DECLARE doc text;
BEGIN
    IF tbl = 'applied_actions' THEN
        SELECT to_jsonb(a)::text INTO doc FROM remediation.applied_actions a
        WHERE a.plan_id = key->>'plan_id' AND a.seq = (key->>'seq')::int;
    ELSIF tbl = 'approvals' THEN
        SELECT to_jsonb(a)::text INTO doc FROM remediation.approvals a WHERE a.id = (key->>'id')::bigint;
    ELSIF tbl = 'timeline' THEN
        SELECT to_jsonb(t)::text INTO doc FROM remediation.timeline t WHERE t.id = (key->>'id')::bigint;
    END IF;
    RETURN doc;
END $$;

CREATE OR REPLACE FUNCTION remediation.chain_audit_row() RETURNS trigger
LANGUAGE plpgsql SET timezone = 'UTC' AS $$
DECLARE
    run text;
    key jsonb;
    prev text;
    last_seq bigint;
BEGIN
    IF TG_TABLE_NAME = 'applied_actions' THEN
        SELECT p.run_id INTO run FROM remediation.plans p WHERE p.plan_id = NEW.plan_id;
        key := jsonb_build_object('plan_id', NEW.plan_id, 'seq', NEW.seq);
    ELSE
        run := NEW.run_id;
        key := jsonb_build_object('id', NEW.id);
    END IF;
    IF run IS NULL THEN
        RETURN NULL;
    END IF;
    -- One writer per run at a time: the chain has one order.
    PERFORM pg_advisory_xact_lock(hashtextextended('remediation.audit_chain:' || run, 0));
    SELECT c.row_hash, c.seq INTO prev, last_seq FROM remediation.audit_chain c
    WHERE c.run_id = run ORDER BY c.seq DESC LIMIT 1;
    INSERT INTO remediation.audit_chain (run_id, seq, table_name, row_key, row_hash)
    VALUES (run, coalesce(last_seq, 0) + 1, TG_TABLE_NAME, key,
            encode(sha256(convert_to(coalesce(prev, '') || '|' || to_jsonb(NEW)::text, 'UTF8')), 'hex'));
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS chain_applied_actions ON remediation.applied_actions;
CREATE TRIGGER chain_applied_actions AFTER INSERT ON remediation.applied_actions
    FOR EACH ROW EXECUTE FUNCTION remediation.chain_audit_row();
DROP TRIGGER IF EXISTS chain_approvals ON remediation.approvals;
CREATE TRIGGER chain_approvals AFTER INSERT ON remediation.approvals
    FOR EACH ROW EXECUTE FUNCTION remediation.chain_audit_row();
DROP TRIGGER IF EXISTS chain_timeline ON remediation.timeline;
CREATE TRIGGER chain_timeline AFTER INSERT ON remediation.timeline
    FOR EACH ROW EXECUTE FUNCTION remediation.chain_audit_row();
