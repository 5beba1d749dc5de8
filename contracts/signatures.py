"""Ed25519 approval signatures: the canonical signed message and its verification (pure, no I/O).

Anyone with access to the Temporal namespace can send an Update claiming any approver's name, so an
approval counts only when it is signed by that approver's key over the exact plan it approves.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from datetime import datetime, timedelta

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from contracts.models import ApprovalDecision, ApproverInfo, PlanSummary

# The approver's clock may run a little ahead of or behind the server's.
CLOCK_SKEW = timedelta(minutes=2)
CONTEXT = "billing-remediation-approval/v1"


def signed_message(decision: ApprovalDecision) -> bytes:
    """The bytes an approver signs: the plan (id and content hash), who, what, when and the comment."""
    comment_digest = hashlib.sha256(decision.comment.encode()).hexdigest()
    fields = [
        CONTEXT,
        decision.plan_id or "",
        decision.plan_hash,
        decision.approver,
        decision.decision,
        decision.signed_at or "",
        comment_digest,
    ]
    return "\n".join(fields).encode()


def verify(public_key_b64: str, decision: ApprovalDecision) -> bool:
    """True when ``decision.signature`` is the approver's signature over ``signed_message``."""
    if not decision.signature:
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64, validate=True))
        key.verify(base64.b64decode(decision.signature, validate=True), signed_message(decision))
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def signature_problem(
    decision: ApprovalDecision,
    approver: ApproverInfo,
    plan: PlanSummary,
    plan_ready_at: datetime,
    now: datetime,
) -> str | None:
    """Why a signed approval must be refused (forged, tampered, for another plan, too old), or None."""
    if approver.public_key is None:
        return f"unsigned: no public key is configured for {approver.name!r}"
    if not decision.signature or not decision.signed_at:
        return "unsigned: approvals must be signed (remediate approve signs with the approver's key)"
    if decision.plan_id != plan.plan_id:
        return f"signed for another plan ({decision.plan_id!r}, awaiting {plan.plan_id!r})"
    if not verify(approver.public_key, decision):
        return f"bad signature: it does not verify with the public key of approver {approver.name}"
    try:
        signed_at = datetime.fromisoformat(decision.signed_at)
    except ValueError:
        return f"bad signature: signed_at {decision.signed_at!r} is not an ISO-8601 time"
    if signed_at.tzinfo is None:
        return "bad signature: signed_at must carry a time zone"
    if signed_at < plan_ready_at - CLOCK_SKEW:
        return "replayed: the signature is older than the plan awaiting approval"
    if signed_at > now + CLOCK_SKEW:
        return "bad signature: signed_at is in the future"
    return None
