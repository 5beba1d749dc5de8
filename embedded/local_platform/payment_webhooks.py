"""The stand-in webhook worker: the provider's `payment_intent.succeeded` credits and links a session.

Signed as the provider signs webhooks (``Stripe-Signature``; the stand-in's secret is its admin
token) and checked with the provider SDK's own verifier. Idempotent: a session is credited once
(key ``payment-credit:<session>``, the platform's) and linked once, however often the event comes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import asyncpg
import stripe
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

ACTOR = "gpuaas-webhook-worker"
SUCCEEDED = "payment_intent.succeeded"
TOLERANCE_SECONDS = 300


async def apply_succeeded(conn: asyncpg.Connection, provider_ref: str, amount: int) -> dict[str, Any] | None:
    """Credit (once) and link the session paid at ``provider_ref``; the session after, or None if unknown."""
    async with conn.transaction():
        session = await conn.fetchrow(
            "SELECT * FROM billing.payment_sessions WHERE provider_ref = $1 FOR UPDATE", provider_ref
        )
        if session is None:
            return None
        if session["amount_minor"] != amount:
            raise ValueError(
                f"session {session['id']}: provider amount {amount} differs from {session['amount_minor']}"
            )
        credit = await conn.fetchval(
            """INSERT INTO billing.ledger_entries (org_id, requested_by_user_id, kind, amount_minor,
                   payment_session_id, idempotency_key, actor, correlation_id)
               VALUES ($1, $2, 'payment_credit', $3, $4, $5, $6, $7)
               ON CONFLICT DO NOTHING RETURNING id""",
            session["org_id"],
            session["user_id"],
            amount,
            session["id"],
            f"payment-credit:{session['id']}",
            ACTOR,
            f"webhook:{provider_ref}",
        ) or await conn.fetchval(
            "SELECT id FROM billing.ledger_entries WHERE payment_session_id = $1 AND kind = 'payment_credit' AND reversed_by_entry_id IS NULL",
            session["id"],
        )
        row = await conn.fetchrow(
            """UPDATE billing.payment_sessions SET ledger_entry_id = coalesce(ledger_entry_id, $2),
                   status = 'completed', completed_at = coalesce(completed_at, now())
               WHERE id = $1 RETURNING id, status, ledger_entry_id""",
            session["id"],
            credit,
        )
        return dict(row)


async def payment_webhook(request: Request) -> Response:
    """POST /webhooks/payment-provider: a signed provider event (only `payment_intent.succeeded` acts)."""
    payload = await request.body()
    try:
        stripe.WebhookSignature.verify_header(
            payload.decode(),
            request.headers.get("stripe-signature"),
            request.app.state.token,
            TOLERANCE_SECONDS,
        )
        event = json.loads(payload)
        if event.get("type") != SUCCEEDED:
            return JSONResponse({"ignored": event.get("type")})
        obj = event["data"]["object"]
        ref, amount = str(obj["id"]), int(obj["amount"])
    except (stripe.SignatureVerificationError, UnicodeDecodeError):
        return JSONResponse({"error": {"code": "bad_signature", "message": "webhook signature invalid"}}, 400)
    except (ValueError, KeyError, TypeError, AttributeError):
        return JSONResponse({"error": {"code": "bad_request", "message": "not a provider event"}}, 400)
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as conn:
        try:
            session = await apply_succeeded(conn, ref, amount)
        except ValueError as err:
            return JSONResponse({"error": {"code": "amount_mismatch", "message": str(err)}}, 409)
    if session is None:
        return JSONResponse({"error": {"code": "unknown_payment", "message": f"no session for {ref}"}}, 404)
    return JSONResponse({"session": session})


def signature_header(payload: str, secret: str, at: int) -> str:
    """The ``Stripe-Signature`` header the provider sends with ``payload`` at unix time ``at``."""
    digest = hmac.new(secret.encode(), f"{at}.{payload}".encode(), hashlib.sha256).hexdigest()
    return f"t={at},v1={digest}"
