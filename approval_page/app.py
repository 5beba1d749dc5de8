"""The approval page's HTTP app: read plans (authenticated), post signed decisions (CSRF-protected).

The browser signs; this server only forwards the signed decision as the same validated Update the
CLI sends (``remediation_client.submit_decision``), so the workflow's validator and the approvals
audit are the same for both. Pages carry no script inline (strict CSP), every value is escaped by the
templates, and nothing secret (database URL, tokens, payload keys) is ever rendered.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from temporalio.client import Client

import remediation_client as operations
from approval_page.queries import actions_page
from config import Settings
from contracts import names
from contracts.models import ApprovalDecision, Phase, format_money
from contracts.signatures import CONTEXT
from database.plan_customers import customers, users
from workflows.input_errors import explain
from workflows.search_attributes import SA_CORRELATION, SA_PHASE

HERE = Path(__file__).parent
COOKIE = "approvals_session"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
Handler = Callable[[Request], Awaitable[Response]]


class Gate:
    """Who may read: the access token (link, cookie or bearer header) or a trusted proxy's user header."""

    def __init__(self, token: str | None, user_header: str | None) -> None:
        if not token and not user_header:
            raise ValueError(
                "APPROVALS_TOKEN (or APPROVALS_TOKEN_FILE) or APPROVALS_USER_HEADER is required: "
                "the approval page never serves plans without authentication"
            )
        self._token = token
        self._user_header = user_header
        self._csrf_key = secrets.token_bytes(32)

    def user(self, request: Request) -> str | None:
        """The authenticated reader, or None."""
        if self._user_header and (name := request.headers.get(self._user_header, "").strip()):
            return name[:128]
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        for given in (request.cookies.get(COOKIE, ""), bearer if scheme.lower() == "bearer" else ""):
            if self._token and given and hmac.compare_digest(given.encode(), self._token.encode()):
                return "token"
        return None

    def csrf(self, request: Request) -> str:
        """The CSRF token of this reader's session (bound to the credential, keyed per process)."""
        basis = request.cookies.get(COOKIE, "") or request.headers.get(self._user_header or "", "")
        return hmac.new(self._csrf_key, basis.encode(), hashlib.sha256).hexdigest()

    def link_token_ok(self, given: str) -> bool:
        return bool(self._token) and hmac.compare_digest(given.encode(), (self._token or "").encode())


def _secure(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def authenticated(handler: Handler) -> Handler:
    """Serve ``handler`` only to an authenticated reader; ``?token=`` sets the session cookie once."""

    async def wrapper(request: Request) -> Response:
        gate: Gate = request.app.state.gate
        given = request.query_params.get("token")
        if given is not None:
            if not gate.link_token_ok(given):
                return _secure(_page(request, "denied.html", {}, status=401))
            # Into an HttpOnly cookie, out of the address bar (and of the history and referrers).
            clean = request.url.remove_query_params("token")
            response = RedirectResponse(str(clean.path) + (f"?{clean.query}" if clean.query else ""), 303)
            response.set_cookie(
                COOKIE,
                given,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                path="/",
            )
            return _secure(response)
        if gate.user(request) is None:
            return _secure(_page(request, "denied.html", {}, status=401))
        return _secure(await handler(request))

    return wrapper


def _page(request: Request, template: str, context: dict[str, Any], status: int = 200) -> Response:
    templates: Jinja2Templates = request.app.state.templates
    gate: Gate = request.app.state.gate
    base = {"csrf": gate.csrf(request), "context": CONTEXT}
    return templates.TemplateResponse(request, template, base | context, status_code=status)


@authenticated
async def list_runs(request: Request) -> Response:
    """GET /: remediations whose plan waits for a decision (Temporal's visibility, this task queue)."""
    settings: Settings = request.app.state.settings
    client: Client = request.app.state.client
    query = (
        f"WorkflowType = '{names.WORKFLOW}' AND ExecutionStatus = 'Running' AND "
        f"{SA_PHASE.name} = '{Phase.AWAITING_APPROVAL.value}' AND TaskQueue = '{settings.task_queue}'"
    )
    runs = []
    async for wf in client.list_workflows(query, limit=200):
        runs.append(
            {
                "workflow_id": wf.id,
                "correlation_id": wf.typed_search_attributes.get(SA_CORRELATION) or "",
                "started": wf.start_time,
            }
        )
    return _page(request, "list.html", {"runs": runs})


@authenticated
async def plan_page(request: Request) -> Response:
    """GET /runs/{workflow_id}: the plan as an approver needs it, its actions by page."""
    workflow_id = request.path_params["workflow_id"]
    try:
        operations.check_workflow_id(workflow_id)
        view = await operations.status(request.app.state.client, workflow_id)
    except operations.OperationError as err:
        return _page(request, "missing.html", {"reason": str(err)}, status=404)
    pool: asyncpg.Pool = request.app.state.pool
    after = request.query_params.get("after", "0")
    start = int(after) if after.isdigit() else 0
    plan = view.plan
    actions, more = await actions_page(pool, plan.plan_id, start) if plan else ([], None)
    touched = await customers(pool, plan.plan_id) if plan else []
    touched_users = await users(pool, plan.plan_id) if plan else []
    currencies = {str(c["currency"]) for c in touched if c["currency"]}
    context = {
        "workflow_id": workflow_id,
        "view": view,
        "plan": plan,
        # What was found, most severe first (the full diagnosis is in the Temporal UI and `remediate status`).
        "findings": [
            f"{c.check.replace('_', ' ')}: {c.headline}"
            for severity in ("critical", "unreachable", "warn")
            for c in view.diagnosis
            if c.status == severity
        ][:4],
        "customers": touched,
        "users": touched_users,
        # Totals in one currency only when every customer shares it (minor units of two currencies
        # do not add up to an amount in either).
        "currency": next(iter(currencies)) if len(currencies) == 1 else None,
        "several_currencies": len(currencies) > 1,
        "actions": actions,
        "applied": any(a["outcome"] for a in actions),
        "next_after": more,
        "after": start,
        "open": view.phase is Phase.AWAITING_APPROVAL and plan is not None,
    }
    return _page(request, "plan.html", context)


@authenticated
async def keys_page(request: Request) -> Response:
    """GET /keys: make this device's signing key (kept in the browser) and show its public key."""
    return _page(request, "keys.html", {})


async def decide(request: Request) -> Response:
    """POST /runs/{workflow_id}/decision: forward the browser-signed decision as the validated Update."""
    gate: Gate = request.app.state.gate
    if gate.user(request) is None:
        return _secure(JSONResponse({"error": "not signed in"}, status_code=401))
    same_origin = request.headers.get("sec-fetch-site") in (None, "same-origin")
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.url.netloc:
        same_origin = False
    given = request.headers.get("x-csrf-token", "")
    if not same_origin or not hmac.compare_digest(given.encode(), gate.csrf(request).encode()):
        return _secure(JSONResponse({"error": "cross-site request refused (CSRF check)"}, status_code=403))
    workflow_id = request.path_params["workflow_id"]
    try:
        operations.check_workflow_id(workflow_id)
        body = ApprovalDecision.model_validate(json.loads(await request.body())).model_copy(
            update={"client": "approval_page"}
        )
    except operations.OperationError as err:
        return _secure(JSONResponse({"error": str(err)}, status_code=400))
    except ValidationError as err:
        return _secure(
            JSONResponse({"error": f"malformed decision: {explain(err, 'body')}"}, status_code=400)
        )
    except ValueError:
        return _secure(JSONResponse({"error": "body is not JSON"}, status_code=400))
    try:
        answer = await operations.submit_decision(
            request.app.state.client, request.app.state.settings, workflow_id, body
        )
    except operations.OperationError as err:
        # The workflow's own reason (stale plan, not an approver, self-approval, quorum, bad signature).
        return _secure(JSONResponse({"error": str(err)}, status_code=409))
    return _secure(JSONResponse({"answer": answer}))


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def approvals_app(settings: Settings, client: Client, pool: asyncpg.Pool) -> Starlette:
    """The ASGI app (``client`` and ``pool`` are the caller's, opened once)."""
    app = Starlette(
        routes=[
            Route("/", list_runs),
            Route("/keys", keys_page),
            Route("/runs/{workflow_id:path}/decision", decide, methods=["POST"]),
            Route("/runs/{workflow_id:path}", plan_page),
            Route("/healthz", healthz),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
    )
    app.state.settings = settings
    app.state.client = client
    app.state.pool = pool
    app.state.gate = Gate(settings.resolved_approvals_token(), settings.approvals_user_header)
    app.state.templates = Jinja2Templates(directory=HERE / "templates")  # autoescape on for .html
    app.state.templates.env.filters["money"] = format_money
    return app
