-- Accounting never deletes an entry: it posts the exact inverse, linked to the original.
-- A reversal is its own kind, carries the original's id (UNIQUE: an entry is reversed at most once) and
-- its usage record or payment session; the original gains the link back, set by the trigger below in
-- the reversal's own transaction, so "live" (unreversed) entries stay readable from narrow indexes.
ALTER TABLE billing.ledger_entries
    ADD COLUMN IF NOT EXISTS reverses_entry_id bigint UNIQUE REFERENCES billing.ledger_entries (id),
    -- Set only by the trigger below, from the reversal row itself (UNIQUE and FK on reverses_entry_id
    -- already guarantee one reversal per entry; a second index and FK check here halved reversal speed).
    ADD COLUMN IF NOT EXISTS reversed_by_entry_id bigint;
ALTER TABLE billing.ledger_entries DROP CONSTRAINT IF EXISTS ledger_entries_kind_check;
ALTER TABLE billing.ledger_entries ADD CONSTRAINT ledger_entries_kind_check
    CHECK (kind IN ('usage_debit', 'payment_credit', 'adjustment', 'reversal'));
ALTER TABLE billing.ledger_entries DROP CONSTRAINT IF EXISTS ledger_reversal_linked;
ALTER TABLE billing.ledger_entries ADD CONSTRAINT ledger_reversal_linked
    CHECK ((kind = 'reversal') = (reverses_entry_id IS NOT NULL));

-- Set-based (one statement-level trigger per INSERT): a reversal of 100,000 entries links them back in
-- one UPDATE instead of 100,000 row triggers.
CREATE OR REPLACE FUNCTION billing.link_reversals() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
    wanted bigint;
    linked bigint;
BEGIN
    SELECT n.reverses_entry_id AS original, o.kind, o.reversed_by_entry_id, o.amount_minor, o.org_id INTO bad
    FROM new_rows n JOIN billing.ledger_entries o ON o.id = n.reverses_entry_id
    WHERE n.reverses_entry_id IS NOT NULL AND (o.kind = 'reversal' OR n.amount_minor <> -o.amount_minor
          OR n.org_id <> o.org_id OR n.usage_record_id IS DISTINCT FROM o.usage_record_id
          OR n.payment_session_id IS DISTINCT FROM o.payment_session_id)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger entry %: a reversal must be the exact inverse of an entry that is not itself a reversal (amount %, org %)',
            bad.original, -bad.amount_minor, bad.org_id;
    END IF;
    SELECT count(*) INTO wanted FROM new_rows WHERE reverses_entry_id IS NOT NULL;
    IF wanted = 0 THEN
        RETURN NULL;
    END IF;
    UPDATE billing.ledger_entries o SET reversed_by_entry_id = n.id
    FROM new_rows n WHERE o.id = n.reverses_entry_id AND o.reversed_by_entry_id IS NULL;
    GET DIAGNOSTICS linked = ROW_COUNT;
    IF linked <> wanted THEN
        RAISE EXCEPTION 'ledger: % of % reversed entries were already reversed', wanted - linked, wanted
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS ledger_link_reversals ON billing.ledger_entries;
CREATE TRIGGER ledger_link_reversals AFTER INSERT ON billing.ledger_entries
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION billing.link_reversals();

-- One live debit per usage record and one live credit per payment session: a reversed one no longer
-- counts, so the record can be billed again (at the right price) under a new key.
DROP INDEX IF EXISTS billing.ledger_one_debit_per_usage;
CREATE UNIQUE INDEX ledger_one_debit_per_usage ON billing.ledger_entries (usage_record_id)
    WHERE kind = 'usage_debit' AND reversed_by_entry_id IS NULL;
DROP INDEX IF EXISTS billing.ledger_one_credit_per_payment;
CREATE UNIQUE INDEX ledger_one_credit_per_payment ON billing.ledger_entries (payment_session_id)
    WHERE kind = 'payment_credit' AND reversed_by_entry_id IS NULL;
DROP INDEX IF EXISTS billing.ledger_debit_org;
CREATE INDEX ledger_debit_org ON billing.ledger_entries (org_id, usage_record_id)
    WHERE kind = 'usage_debit' AND reversed_by_entry_id IS NULL;
DROP INDEX IF EXISTS billing.ledger_debit_user;
CREATE INDEX ledger_debit_user ON billing.ledger_entries (requested_by_user_id, usage_record_id)
    WHERE kind = 'usage_debit' AND reversed_by_entry_id IS NULL;
-- Reversed entries: few, read when a record is billed again.
CREATE INDEX IF NOT EXISTS ledger_reversed ON billing.ledger_entries (usage_record_id, payment_session_id)
    WHERE reversed_by_entry_id IS NOT NULL;
-- Live credits remediations posted: re-checked at the provider on every run (refunded or disputed since?).
CREATE INDEX IF NOT EXISTS ledger_remediation_credits ON billing.ledger_entries (created_at)
    WHERE kind = 'payment_credit' AND reversed_by_entry_id IS NULL AND actor LIKE 'remediation:%';
-- Each customer's balance (a plan records it for every org it touches): an index-only sum per org.
DROP INDEX IF EXISTS billing.ledger_org;
CREATE INDEX ledger_org ON billing.ledger_entries (org_id) INCLUDE (amount_minor);
DROP INDEX IF EXISTS billing.ledger_user;
CREATE INDEX ledger_user ON billing.ledger_entries (requested_by_user_id) INCLUDE (org_id, amount_minor);
