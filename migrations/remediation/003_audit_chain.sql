-- Tamper evidence: every audit row of a run (applied and API actions, approvals and refusals, timeline)
-- is chained in insertion order. One link per INSERT statement (an apply batch writes hundreds of audit
-- rows in one statement; a link per row halved apply throughput): the link stores each row's key and
-- digest (sha256 of the row as JSON, rendered in UTC so any session verifies) and
--     row_hash = sha256(previous row_hash || '|' || the rows' digests joined by ',').
-- Editing, deleting or reordering a row breaks its digest or the chain from there on; the evidence pack
-- records (and the worker signs) the chain's head.
CREATE TABLE IF NOT EXISTS remediation.audit_chain (
    run_id      text NOT NULL,
    seq         bigint NOT NULL,
    table_name  text NOT NULL,
    row_keys    jsonb NOT NULL,   -- array of the rows' keys, in digest order
    row_digests text[] NOT NULL,
    row_hash    text NOT NULL,
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

CREATE OR REPLACE FUNCTION remediation.append_audit_link(run text, tbl text, keys jsonb, digests text[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    prev text;
    last_seq bigint;
BEGIN
    -- One writer per run at a time: the chain has one order.
    PERFORM pg_advisory_xact_lock(hashtextextended('remediation.audit_chain:' || run, 0));
    SELECT c.row_hash, c.seq INTO prev, last_seq FROM remediation.audit_chain c
    WHERE c.run_id = run ORDER BY c.seq DESC LIMIT 1;
    INSERT INTO remediation.audit_chain (run_id, seq, table_name, row_keys, row_digests, row_hash)
    VALUES (run, coalesce(last_seq, 0) + 1, tbl, keys, digests,
            encode(sha256(convert_to(coalesce(prev, '') || '|' || array_to_string(digests, ','), 'UTF8')), 'hex'));
END $$;

CREATE OR REPLACE FUNCTION remediation.chain_applied_actions() RETURNS trigger
LANGUAGE plpgsql SET timezone = 'UTC' AS $$
DECLARE link record;
BEGIN
    FOR link IN
        SELECT p.run_id,
               jsonb_agg(jsonb_build_object('plan_id', n.plan_id, 'seq', n.seq) ORDER BY n.plan_id, n.seq) AS keys,
               array_agg(encode(sha256(convert_to(to_jsonb(n)::text, 'UTF8')), 'hex') ORDER BY n.plan_id, n.seq)
                   AS digests
        FROM new_rows n JOIN remediation.plans p ON p.plan_id = n.plan_id GROUP BY p.run_id
    LOOP
        PERFORM remediation.append_audit_link(link.run_id, TG_TABLE_NAME, link.keys, link.digests);
    END LOOP;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION remediation.chain_by_id() RETURNS trigger
LANGUAGE plpgsql SET timezone = 'UTC' AS $$
DECLARE link record;
BEGIN
    -- approvals and timeline: both keyed by id, both carrying run_id.
    FOR link IN
        SELECT n.run_id, jsonb_agg(jsonb_build_object('id', n.id) ORDER BY n.id) AS keys,
               array_agg(encode(sha256(convert_to(n.doc, 'UTF8')), 'hex') ORDER BY n.id) AS digests
        FROM (SELECT r.run_id, r.id, to_jsonb(r)::text AS doc FROM new_rows r) n GROUP BY n.run_id
    LOOP
        PERFORM remediation.append_audit_link(link.run_id, TG_TABLE_NAME, link.keys, link.digests);
    END LOOP;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS chain_applied_actions ON remediation.applied_actions;
CREATE TRIGGER chain_applied_actions AFTER INSERT ON remediation.applied_actions
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION remediation.chain_applied_actions();
DROP TRIGGER IF EXISTS chain_approvals ON remediation.approvals;
CREATE TRIGGER chain_approvals AFTER INSERT ON remediation.approvals
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION remediation.chain_by_id();
DROP TRIGGER IF EXISTS chain_timeline ON remediation.timeline;
CREATE TRIGGER chain_timeline AFTER INSERT ON remediation.timeline
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION remediation.chain_by_id();
