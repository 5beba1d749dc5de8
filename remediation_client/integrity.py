"""`remediate verify-evidence`: the run's audit chain recomputed from the database, the pack's signature."""

from __future__ import annotations

import asyncpg

from config import Settings
from config.approver_keys import read_public_key
from config.settings import EVIDENCE_SIGNER
from database.audit_chain import check_chain, document_digest, links_after, seal_signature_ok, signature_ok
from remediation_client.reads import latest_evidence


async def verify_evidence(settings: Settings, workflow_id: str) -> tuple[list[str], list[str]]:
    """(problems, facts) for the latest run of ``workflow_id``; no problems means verified."""
    conn = await asyncpg.connect(settings.resolved_database_url())
    try:
        run_id, document = await latest_evidence(conn, workflow_id)
        chain = await check_chain(conn, run_id)
        seal = await conn.fetchrow("SELECT * FROM remediation.run_seals WHERE run_id = $1", run_id)
        block = document.get("integrity") or {}
        # Rows the run did not write: after its seal, or (unsealed) after the pack's head.
        covered = int(seal["chain_length"]) if seal is not None else int(block.get("chain_length") or 0)
        appended = await links_after(conn, run_id, covered) if block else []
    finally:
        await conn.close()
    facts = [f"run {run_id}: {chain.length} audit-chain links"]
    if not block:
        return ["the evidence pack has no integrity block"], facts
    problems = []
    if chain.first_bad is not None:
        problems.append(chain.first_bad)
    elif chain.head_at(int(block["chain_length"])) != block["chain_head"]:
        problems.append(
            f"the first {block['chain_length']} chain links no longer hash to the head the pack recorded"
        )
    elif seal is not None and chain.head_at(int(seal["chain_length"])) != seal["chain_head"]:
        problems.append(
            f"the first {seal['chain_length']} chain links no longer hash to the head the run was sealed with"
        )
    if appended:
        after = "the run's seal" if seal is not None else "the evidence pack's head (the run has no seal)"
        shown = "; ".join(appended[:10]) + (f"; and {len(appended) - 10} more" if len(appended) > 10 else "")
        problems.append(f"{len(appended)} audit rows were chained after {after}: {shown}")
    facts.append(f"the pack covers {block['chain_length']} links, head {str(block['chain_head'])[:16]}")
    if seal is not None:
        facts.append(f"the run was sealed at {seal['chain_length']} links when it ended")
    if document_digest(document) != block.get("document_sha256"):
        problems.append("the evidence document was changed after it was signed")
    trusted = settings.evidence_public_key or read_public_key(settings.resolved_keys_dir(), EVIDENCE_SIGNER)
    if trusted is None:
        problems.append(
            f"no trusted key to check the signature (EVIDENCE_PUBLIC_KEY or {EVIDENCE_SIGNER}.pub)"
        )
    elif not block.get("signature"):
        problems.append("the pack is unsigned (the worker had no EVIDENCE_SIGNING_KEY_FILE)")
    elif not signature_ok(document, run_id, trusted):
        problems.append("the signature does not verify under the trusted key")
    if trusted is not None and seal is not None and not seal_signature_ok(seal, run_id, trusted):
        problems.append("the run's seal does not verify under the trusted key")
    return problems, facts
