-- Accounting never deletes an entry: it posts the exact inverse, linked to the original.
-- A reversal is its own kind, carries the original's id (UNIQUE: an entry is reversed at most once) and
-- its usage record or payment session; the original gains the link back, set by the trigger below in
-- the reversal's own transaction, so "live" (unreversed) entries stay readable from narrow indexes.
ALTER TABLE billing.ledger_entries
    ADD COLUMN IF NOT EXISTS reverses_entry_id bigint UNIQUE REFERENCES billing.ledger_entries (id),
    ADD COLUMN IF NOT EXISTS reversed_by_entry_id bigint UNIQUE REFERENCES billing.ledger_entries (id);
ALTER TABLE billing.ledger_entries DROP CONSTRAINT IF EXISTS ledger_entries_kind_check;
ALTER TABLE billing.ledger_entries ADD CONSTRAINT ledger_entries_kind_check
    CHECK (kind IN ('usage_debit', 'payment_credit', 'adjustment', 'reversal'));
ALTER TABLE billing.ledger_entries DROP CONSTRAINT IF EXISTS ledger_reversal_linked;
ALTER TABLE billing.ledger_entries ADD CONSTRAINT ledger_reversal_linked
    CHECK ((kind = 'reversal') = (reverses_entry_id IS NOT NULL));

CREATE OR REPLACE FUNCTION billing.link_reversal() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    original billing.ledger_entries%ROWTYPE;
BEGIN
    SELECT * INTO original FROM billing.ledger_entries WHERE id = NEW.reverses_entry_id FOR UPDATE;
    IF original.kind = 'reversal' THEN
        RAISE EXCEPTION 'ledger entry %: a reversal is not reversed again', original.id;
    END IF;
    IF original.reversed_by_entry_id IS NOT NULL THEN
        RAISE EXCEPTION 'ledger entry % is already reversed by %', original.id, original.reversed_by_entry_id
            USING ERRCODE = 'unique_violation';
    END IF;
    IF NEW.amount_minor <> -original.amount_minor OR NEW.org_id <> original.org_id
       OR NEW.usage_record_id IS DISTINCT FROM original.usage_record_id
       OR NEW.payment_session_id IS DISTINCT FROM original.payment_session_id THEN
        RAISE EXCEPTION 'ledger entry %: a reversal must be its exact inverse (amount %, org %)',
            original.id, -original.amount_minor, original.org_id;
    END IF;
    UPDATE billing.ledger_entries SET reversed_by_entry_id = NEW.id WHERE id = original.id;
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS ledger_link_reversal ON billing.ledger_entries;
CREATE TRIGGER ledger_link_reversal AFTER INSERT ON billing.ledger_entries
    FOR EACH ROW WHEN (NEW.reverses_entry_id IS NOT NULL) EXECUTE FUNCTION billing.link_reversal();

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
