"""The run's audit chain (migrations/remediation/003_audit_chain.sql): its head, and its verification.

Shared by the worker (the evidence pack records and signs the head) and the client
(`remediate verify-evidence`), so both read the chain the same way.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import asyncpg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNED_PREFIX = "billing-remediation/evidence/v1"


@dataclass(frozen=True)
class ChainCheck:
    """The chain as recomputed from the rows it covers."""

    length: int
    hashes: tuple[str, ...]  # the recomputed hash after each link (link n at index n - 1)
    first_bad: str | None  # names the first row that differs, or None

    def head_at(self, length: int) -> str:
        """The chain's head after ``length`` links ('' for none)."""
        return self.hashes[length - 1] if 0 < length <= len(self.hashes) else ""


def document_digest(document: dict[str, Any]) -> str:
    """sha256 of the evidence document without its integrity block, as canonical JSON."""
    body = {k: v for k, v in document.items() if k != "integrity"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def signed_message(run_id: str, length: int, head: str, digest: str) -> bytes:
    """What the worker signs: the run, the chain's length and head, the document's digest."""
    return "\n".join((SIGNED_PREFIX, run_id, str(length), head, digest)).encode()


async def check_chain(conn: asyncpg.Connection | asyncpg.Pool, run_id: str) -> ChainCheck:
    """Recompute every row's digest and every link from the rows themselves; name the first row that is
    gone, edited or moved (or a link whose stored digests were rewritten)."""
    links = await conn.fetch(
        "SELECT seq, row_digests, row_hash FROM remediation.audit_chain WHERE run_id = $1 ORDER BY seq",
        run_id,
    )
    rows = await conn.fetch(
        """SELECT c.seq, e.ord, c.table_name, e.key, remediation.audit_row(c.table_name, e.key) AS doc
           FROM remediation.audit_chain c CROSS JOIN LATERAL jsonb_array_elements(c.row_keys) WITH ORDINALITY e(key, ord)
           WHERE c.run_id = $1 ORDER BY c.seq, e.ord""",
        run_id,
    )
    docs: dict[int, list[asyncpg.Record]] = {}
    for row in rows:
        docs.setdefault(row["seq"], []).append(row)
    hashes: list[str] = []
    prev = ""
    for expected_seq, link in enumerate(links, start=1):
        if link["seq"] != expected_seq:
            return ChainCheck(len(links), tuple(hashes), f"chain link {expected_seq} is missing")
        for row, stored in zip(docs.get(link["seq"], []), link["row_digests"], strict=False):
            where = f"chain link {link['seq']}, {row['table_name']} {row['key']}"
            if row["doc"] is None:
                return ChainCheck(len(links), tuple(hashes), f"{where}: the row is gone")
            if hashlib.sha256(row["doc"].encode()).hexdigest() != stored:
                return ChainCheck(len(links), tuple(hashes), f"{where}: the row was edited or moved")
        digest = hashlib.sha256(f"{prev}|{','.join(link['row_digests'])}".encode()).hexdigest()
        if digest != link["row_hash"] or len(docs.get(link["seq"], [])) != len(link["row_digests"]):
            return ChainCheck(
                len(links), tuple(hashes), f"chain link {link['seq']}: its record was rewritten"
            )
        hashes.append(digest)
        prev = digest
    unchained = await conn.fetchval(
        """SELECT count(*) FROM (
               SELECT 'timeline' AS t, jsonb_build_object('id', id) AS k FROM remediation.timeline WHERE run_id = $1
               UNION ALL
               SELECT 'approvals', jsonb_build_object('id', id) FROM remediation.approvals WHERE run_id = $1
               UNION ALL
               SELECT 'applied_actions', jsonb_build_object('plan_id', a.plan_id, 'seq', a.seq)
               FROM remediation.applied_actions a JOIN remediation.plans p USING (plan_id) WHERE p.run_id = $1
           ) r WHERE NOT EXISTS (SELECT 1 FROM remediation.audit_chain c
                                 WHERE c.run_id = $1 AND c.table_name = r.t AND c.row_keys @> jsonb_build_array(r.k))""",
        run_id,
    )
    if unchained:
        return ChainCheck(
            len(links), tuple(hashes), f"{unchained} audit rows are not in the chain (added afterwards)"
        )
    return ChainCheck(len(links), tuple(hashes), None)


async def chain_head(conn: asyncpg.Connection | asyncpg.Pool, run_id: str) -> tuple[int, str]:
    """The chain's current length and head hash ('' for an empty chain)."""
    row = await conn.fetchrow(
        "SELECT seq, row_hash FROM remediation.audit_chain WHERE run_id = $1 ORDER BY seq DESC LIMIT 1",
        run_id,
    )
    return (0, "") if row is None else (int(row["seq"]), str(row["row_hash"]))


SEAL_PREFIX = "billing-remediation/seal/v1"


def seal_message(run_id: str, length: int, head: str) -> bytes:
    """What the worker signs when a run ends: the run and its audit chain's final length and head."""
    return "\n".join((SEAL_PREFIX, run_id, str(length), head)).encode()


async def seal_run(
    conn: asyncpg.Connection | asyncpg.Pool, run_id: str, key: Ed25519PrivateKey | None
) -> None:
    """Sign and store the run's final chain head (re-sealing after a retried close covers the same rows)."""
    length, head = await chain_head(conn, run_id)
    signature = public = None
    if key is not None:
        signature = base64.b64encode(key.sign(seal_message(run_id, length, head))).decode()
        public = base64.b64encode(key.public_key().public_bytes_raw()).decode()
    await conn.execute(
        """INSERT INTO remediation.run_seals (run_id, chain_length, chain_head, signature, public_key)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (run_id) DO UPDATE SET chain_length = excluded.chain_length,
               chain_head = excluded.chain_head, signature = excluded.signature,
               public_key = excluded.public_key, sealed_at = now()""",
        run_id,
        length,
        head,
        signature,
        public,
    )


def _verifies(trusted_public_key: str, signature: str | None, message: bytes) -> bool:
    """``signature`` (base64 Ed25519) is the trusted key's over ``message``."""
    if not signature:
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(trusted_public_key))
        key.verify(base64.b64decode(signature), message)
    except (InvalidSignature, ValueError):
        return False
    return True


def seal_signature_ok(seal: asyncpg.Record, run_id: str, trusted_public_key: str) -> bool:
    """The seal's signature verifies under the trusted key (not the key the seal names)."""
    message = seal_message(run_id, int(seal["chain_length"]), str(seal["chain_head"]))
    return _verifies(trusted_public_key, seal["signature"], message)


async def links_after(conn: asyncpg.Connection | asyncpg.Pool, run_id: str, length: int) -> list[str]:
    """The rows chained after link ``length``, named (table, key and what the row says)."""
    rows = await conn.fetch(
        """SELECT c.seq, c.table_name, e.key,
                  CASE c.table_name
                    WHEN 'approvals' THEN (SELECT a.approver || ' ' || a.decision || CASE WHEN a.accepted
                        THEN ' (accepted)' ELSE ' (refused)' END FROM remediation.approvals a
                        WHERE a.id = (e.key->>'id')::bigint)
                    WHEN 'applied_actions' THEN (SELECT a.kind || ' ' || a.idempotency_key || ' ' || a.outcome
                        FROM remediation.applied_actions a
                        WHERE a.plan_id = e.key->>'plan_id' AND a.seq = (e.key->>'seq')::int)
                    WHEN 'timeline' THEN (SELECT left(t.message, 80) FROM remediation.timeline t
                        WHERE t.id = (e.key->>'id')::bigint)
                  END AS what
           FROM remediation.audit_chain c CROSS JOIN LATERAL jsonb_array_elements(c.row_keys) e(key)
           WHERE c.run_id = $1 AND c.seq > $2 ORDER BY c.seq""",
        run_id,
        length,
    )
    return [f"link {r['seq']}: {r['table_name']} {r['key']} ({r['what'] or 'row gone'})" for r in rows]


def sign_integrity(
    key: Ed25519PrivateKey | None, run_id: str, length: int, head: str, document: dict[str, Any]
) -> dict[str, Any]:
    """The evidence pack's integrity block: the chain head it covers and the worker's signature."""
    digest = document_digest(document)
    block: dict[str, Any] = {"chain_length": length, "chain_head": head, "document_sha256": digest}
    if key is None:
        return block | {"signature": None, "public_key": None}
    signature = key.sign(signed_message(run_id, length, head, digest))
    public = key.public_key().public_bytes_raw()
    return block | {
        "signature": base64.b64encode(signature).decode(),
        "public_key": base64.b64encode(public).decode(),
    }


def signature_ok(document: dict[str, Any], run_id: str, trusted_public_key: str) -> bool:
    """The pack's signature verifies under the trusted key (not the key the pack names)."""
    block = document.get("integrity") or {}
    try:
        message = signed_message(
            run_id, int(block["chain_length"]), str(block["chain_head"]), document_digest(document)
        )
    except (KeyError, ValueError):
        return False
    return _verifies(trusted_public_key, block.get("signature"), message)
