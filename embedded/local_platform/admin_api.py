"""The platform's billing API: financial posture, launch precheck/submit, and admin endpoints."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from local_platform import telemetry
from local_platform.billing_worker import worker_mode
from local_platform.payment_webhooks import payment_webhook
from worker.supervised_loop import health_report

SERVICE = "gpuaas-api"
Handler = Callable[[Request], Awaitable[Response]]


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _pool(request: Request) -> asyncpg.Pool:
    pool: asyncpg.Pool = request.app.state.pool
    return pool


def authorized(handler: Handler) -> Handler:
    """Require ``Authorization: Bearer <token>`` matching the configured token."""

    async def wrapper(request: Request) -> Response:
        expected: str = request.app.state.token
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
            return _error(401, "unauthorized", "missing or invalid bearer token")
        return await handler(request)

    return wrapper


async def _json_body(request: Request, *required: str) -> dict[str, Any] | JSONResponse:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, "bad_request", "body must be a JSON object")
    if not isinstance(body, dict):
        return _error(400, "bad_request", "body must be a JSON object")
    missing = [name for name in required if not body.get(name)]
    if missing:
        return _error(400, "bad_request", f"missing field(s): {', '.join(missing)}")
    return body


async def posture_for(conn: asyncpg.Pool | asyncpg.Connection, org_id: str) -> dict[str, Any] | None:
    """The org's financial posture in the platform's response shape."""
    org = await conn.fetchrow("SELECT id, billing_mode, currency FROM billing.orgs WHERE id = $1", org_id)
    if org is None:
        return None
    balance = await conn.fetchval(
        "SELECT coalesce(sum(amount_minor), 0) FROM billing.ledger_entries WHERE org_id = $1", org_id
    )
    restriction = await conn.fetchrow(
        "SELECT * FROM billing.financial_restrictions WHERE org_id = $1", org_id
    )
    state = restriction["state"] if restriction else "none"
    return {
        "org_id": org_id,
        "billing_mode": org["billing_mode"],
        "currency": org["currency"],
        "balance_minor": int(balance),
        "state": state,
        "reason": restriction["reason"] if restriction and state != "none" else None,
        "effects": {"block_new_launches": bool(restriction and restriction["block_new_launches"])},
    }


def _billing_check(posture: dict[str, Any]) -> dict[str, Any]:
    if posture["state"] == "restricted" and posture["effects"]["block_new_launches"]:
        return {
            "id": "billing",
            "severity": "blocker",
            "reason": posture["reason"],
            "message": "new launches are blocked by the billing posture",
        }
    if posture["state"] == "warning":
        # A downgraded restriction warns but no longer blocks: the runbook's recovery expects `ok` here.
        return {
            "id": "billing",
            "severity": "ok",
            "reason": posture["reason"],
            "message": "billing warning: launches allowed",
        }
    return {"id": "billing", "severity": "ok", "reason": None, "message": "billing allows launches"}


async def _org_for_request(request: Request) -> str | None:
    org = request.headers.get("x-org-id") or request.query_params.get("org_id")
    if org:
        return org
    project = request.headers.get("x-project-id")
    if project:
        value = await _pool(request).fetchval("SELECT org_id FROM billing.projects WHERE id = $1", project)
        return str(value) if value else None
    return None


@authorized
async def financial_posture(request: Request) -> Response:
    """GET /api/v1/billing/financial-posture"""
    org_id = await _org_for_request(request)
    if not org_id:
        return _error(400, "bad_request", "X-Org-ID header (or org_id query) or X-Project-ID is required")
    posture = await posture_for(_pool(request), org_id)
    if posture is None:
        return _error(404, "not_found", f"unknown org {org_id!r}")
    return JSONResponse(posture)


@authorized
async def launch_precheck(request: Request) -> Response:
    """POST /api/v1/v3/launch/compute/precheck"""
    body = await _json_body(request, "sku")
    if isinstance(body, JSONResponse):
        return body
    org_id = await _org_for_request(request)
    if not org_id:
        return _error(400, "bad_request", "X-Project-ID header naming a known project is required")
    posture = await posture_for(_pool(request), org_id)
    if posture is None:
        return _error(404, "not_found", f"unknown org {org_id!r}")
    checks = [
        _billing_check(posture),
        {"id": "quota", "severity": "ok", "reason": None, "message": "quota ok"},
    ]
    return JSONResponse(
        {"sku": body["sku"], "ok": all(c["severity"] != "blocker" for c in checks), "checks": checks}
    )


@authorized
async def launch_submit(request: Request) -> Response:
    """POST /api/v1/v3/launch/compute: 402 insufficient_balance while restricted."""
    body = await _json_body(request, "sku")
    if isinstance(body, JSONResponse):
        return body
    org_id = await _org_for_request(request)
    posture = await posture_for(_pool(request), org_id) if org_id else None
    if posture is None:
        return _error(400, "bad_request", "X-Project-ID header naming a known project is required")
    if _billing_check(posture)["severity"] == "blocker":
        return _error(402, "insufficient_balance", "prepaid balance depleted; add funds to launch")
    return JSONResponse({"accepted": True, "sku": body["sku"]}, status_code=202)


@authorized
async def freeze(request: Request) -> Response:
    """POST /api/v1/admin/billing/adjustments/freeze (idempotent per freeze_id)."""
    body = await _json_body(request, "freeze_id", "scope_key", "reason", "actor")
    if isinstance(body, JSONResponse):
        return body
    pool = _pool(request)
    await pool.execute(
        """INSERT INTO billing.adjustment_freezes (freeze_id, scope_key, reason, frozen_by, correlation_id)
           VALUES ($1,$2,$3,$4,$5) ON CONFLICT (freeze_id) DO NOTHING""",
        body["freeze_id"],
        body["scope_key"],
        body["reason"],
        body["actor"],
        body.get("correlation_id"),
    )
    row = await pool.fetchrow(
        "SELECT * FROM billing.adjustment_freezes WHERE freeze_id = $1", body["freeze_id"]
    )
    await telemetry.log(
        pool,
        SERVICE,
        "warn",
        f"manual adjustments frozen for {body['scope_key']}",
        correlation_id=body.get("correlation_id"),
        actor=body["actor"],
    )
    return JSONResponse(
        {"freeze_id": row["freeze_id"], "scope_key": row["scope_key"], "active": row["lifted_at"] is None}
    )


@authorized
async def unfreeze(request: Request) -> Response:
    """POST /api/v1/admin/billing/adjustments/unfreeze (idempotent)."""
    body = await _json_body(request, "freeze_id", "actor")
    if isinstance(body, JSONResponse):
        return body
    pool = _pool(request)
    row = await pool.fetchrow(
        """UPDATE billing.adjustment_freezes SET lifted_at = coalesce(lifted_at, now()),
               lifted_by = coalesce(lifted_by, $2) WHERE freeze_id = $1 RETURNING *""",
        body["freeze_id"],
        body["actor"],
    )
    if row is None:
        return _error(404, "not_found", f"unknown freeze {body['freeze_id']!r}")
    return JSONResponse({"freeze_id": row["freeze_id"], "scope_key": row["scope_key"], "active": False})


@authorized
async def list_freezes(request: Request) -> Response:
    """GET /api/v1/admin/billing/adjustments/freezes"""
    rows = await _pool(request).fetch(
        "SELECT freeze_id, scope_key, frozen_by, lifted_at IS NULL AS active FROM billing.adjustment_freezes"
        " ORDER BY frozen_at"
    )
    return JSONResponse({"freezes": [dict(r) for r in rows]})


@authorized
async def manual_adjustment(request: Request) -> Response:
    """POST /api/v1/admin/billing/adjustments: refused (423) while a freeze covers the org."""
    body = await _json_body(
        request, "org_id", "user_id", "amount_minor", "reason", "actor", "idempotency_key"
    )
    if isinstance(body, JSONResponse):
        return body
    if not isinstance(body["amount_minor"], int) or isinstance(body["amount_minor"], bool):
        return _error(400, "bad_request", "amount_minor must be an integer number of minor units")
    pool = _pool(request)
    frozen = await pool.fetchval(
        """SELECT freeze_id FROM billing.adjustment_freezes WHERE lifted_at IS NULL
           AND (scope_key = 'global' OR scope_key = $1 OR scope_key LIKE $2) LIMIT 1""",
        f"org:{body['org_id']}",
        f"org:{body['org_id']}/%",
    )
    if frozen:
        return _error(423, "adjustments_frozen", f"manual adjustments are frozen ({frozen})")
    entry_id = await pool.fetchval(
        """INSERT INTO billing.ledger_entries (org_id, requested_by_user_id, kind, amount_minor, idempotency_key,
               actor, correlation_id) VALUES ($1,$2,'adjustment',$3,$4,$5,$6)
           ON CONFLICT (idempotency_key) DO NOTHING RETURNING id""",
        body["org_id"],
        body["user_id"],
        body["amount_minor"],
        body["idempotency_key"],
        body["actor"],
        body.get("correlation_id"),
    )
    return JSONResponse({"ledger_entry_id": entry_id, "duplicate": entry_id is None})


@authorized
async def clear_restriction(request: Request) -> Response:
    """POST /api/v1/admin/billing/restrictions/{org_id}/clear with mode clear|downgrade."""
    body = await _json_body(request, "actor", "idempotency_key")
    if isinstance(body, JSONResponse):
        return body
    mode = body.get("mode", "clear")
    if mode not in ("clear", "downgrade"):
        return _error(400, "bad_request", "mode must be 'clear' or 'downgrade'")
    org_id = request.path_params["org_id"]
    pool = _pool(request)
    async with pool.acquire() as conn, conn.transaction():
        first = await conn.fetchval(
            """INSERT INTO billing.admin_audit (actor, action, target, correlation_id, idempotency_key, detail)
               VALUES ($1, 'restriction.' || $2, $3, $4, $5, $6) ON CONFLICT (idempotency_key) DO NOTHING
               RETURNING id""",
            body["actor"],
            mode,
            org_id,
            body.get("correlation_id"),
            body["idempotency_key"],
            json.dumps(body),
        )
        if first is not None:
            new_state, block = ("none", False) if mode == "clear" else ("warning", False)
            await conn.execute(
                """UPDATE billing.financial_restrictions SET state = $2, block_new_launches = $3,
                       updated_at = now(), updated_by = $4, correlation_id = $5 WHERE org_id = $1""",
                org_id,
                new_state,
                block,
                body["actor"],
                body.get("correlation_id"),
            )
    posture = await posture_for(pool, org_id)
    if posture is None:
        return _error(404, "not_found", f"unknown org {org_id!r}")
    return JSONResponse({**posture, "duplicate": first is None})


@authorized
async def restart_worker(request: Request) -> Response:
    """POST /api/v1/admin/billing-worker/restart: the configured restart hook."""
    body = await _json_body(request, "actor")
    if isinstance(body, JSONResponse):
        return body
    pool = _pool(request)
    restarts = await pool.fetchval(
        "UPDATE billing.worker_control SET mode = 'running', restarts = restarts + 1, updated_at = now()"
        " WHERE id = 1 RETURNING restarts"
    )
    await telemetry.log(
        pool,
        "gpuaas-billing-worker",
        "info",
        "billing worker restarted",
        correlation_id=body.get("correlation_id"),
        actor=body["actor"],
    )
    return JSONResponse({"mode": "running", "restarts": restarts})


async def deployments_doc(conn: asyncpg.Pool | asyncpg.Connection) -> dict[str, Any]:
    """The billing worker's revisions, newest first, with the current one and the one before it."""
    rows = await conn.fetch(
        """SELECT d.revision, d.version, d.rolled_out_at, d.rolled_back_at, d.revision = c.revision AS current
           FROM billing.worker_deployments d CROSS JOIN billing.worker_control c
           WHERE c.id = 1 ORDER BY d.revision DESC"""
    )

    def doc(row: asyncpg.Record) -> dict[str, Any]:
        return {
            "revision": row["revision"],
            "version": row["version"],
            "rolled_out_at": row["rolled_out_at"].isoformat(),
            "rolled_back_at": row["rolled_back_at"].isoformat() if row["rolled_back_at"] else None,
        }

    current = next(r for r in rows if r["current"])
    # What a rollback runs: the newest earlier revision that was not itself rolled back.
    previous = next(
        (r for r in rows if r["revision"] < current["revision"] and not r["rolled_back_at"]), None
    )
    return {
        "current": doc(current),
        "previous": doc(previous) if previous else None,
        "history": [doc(r) for r in rows],
    }


@authorized
async def worker_deployments(request: Request) -> Response:
    """GET /api/v1/admin/billing-worker/deployments: current and previous revisions, with rollout times."""
    return JSONResponse(await deployments_doc(_pool(request)))


@authorized
async def rollback_worker(request: Request) -> Response:
    """POST /api/v1/admin/billing-worker/rollback: run an earlier revision (idempotent per target)."""
    body = await _json_body(request, "actor", "to_revision")
    if isinstance(body, JSONResponse):
        return body
    target = body["to_revision"]
    if not isinstance(target, int) or isinstance(target, bool):
        return _error(400, "bad_request", f"to_revision must be an integer revision, got {target!r}")
    pool = _pool(request)
    async with pool.acquire() as conn, conn.transaction():
        current = await conn.fetchval("SELECT revision FROM billing.worker_control WHERE id = 1 FOR UPDATE")
        version = await conn.fetchval(
            "SELECT version FROM billing.worker_deployments WHERE revision = $1", target
        )
        if version is None:
            return _error(404, "not_found", f"unknown billing worker revision {target}")
        if target > current:
            return _error(409, "not_a_rollback", f"revision {target} is newer than the current {current}")
        duplicate = target == current
        if not duplicate:
            await conn.execute(
                """UPDATE billing.worker_deployments SET rolled_back_at = now()
                   WHERE revision > $1 AND rolled_back_at IS NULL""",
                target,
            )
            await conn.execute(
                """UPDATE billing.worker_control SET revision = $1, mode = 'running', restarts = restarts + 1,
                       updated_at = now() WHERE id = 1""",
                target,
            )
            await telemetry.log(
                conn,
                "gpuaas-billing-worker",
                "info",
                f"billing worker rolled back from revision {current} to {version}",
                correlation_id=body.get("correlation_id"),
                actor=body["actor"],
                version=version,
            )
        doc = await deployments_doc(conn)
    return JSONResponse({**doc, "duplicate": duplicate, "rolled_back_from": None if duplicate else current})


async def healthz(request: Request) -> Response:
    """Liveness of the API and of each background loop (billing worker, outbox relay); 503 if one fails."""
    ok, loops = health_report(getattr(request.app.state, "loops", {}))
    # The worker's control mode too: in a simulated incident the loop is alive but consumes nothing.
    try:
        mode: str | None = await worker_mode(_pool(request))
    except (OSError, asyncpg.PostgresError):
        mode = None
    return JSONResponse({"ok": ok, "worker_mode": mode, "loops": loops}, status_code=200 if ok else 503)


ROUTES = [
    Route("/healthz", healthz),
    Route("/api/v1/billing/financial-posture", financial_posture),
    Route("/api/v1/v3/launch/compute/precheck", launch_precheck, methods=["POST"]),
    Route("/api/v1/v3/launch/compute", launch_submit, methods=["POST"]),
    Route("/api/v1/admin/billing/adjustments/freeze", freeze, methods=["POST"]),
    Route("/api/v1/admin/billing/adjustments/unfreeze", unfreeze, methods=["POST"]),
    Route("/api/v1/admin/billing/adjustments/freezes", list_freezes),
    Route("/api/v1/admin/billing/adjustments", manual_adjustment, methods=["POST"]),
    Route("/api/v1/admin/billing/restrictions/{org_id}/clear", clear_restriction, methods=["POST"]),
    Route("/api/v1/admin/billing-worker/restart", restart_worker, methods=["POST"]),
    Route("/api/v1/admin/billing-worker/deployments", worker_deployments),
    Route("/api/v1/admin/billing-worker/rollback", rollback_worker, methods=["POST"]),
    Route("/webhooks/payment-provider", payment_webhook, methods=["POST"]),
]
