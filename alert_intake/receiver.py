"""HTTP receiver for Alertmanager's webhook (version 4), with bearer-token auth."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections import Counter

import asyncpg
from prometheus_client.core import CounterMetricFamily
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.service import RPCError

from alert_intake.alertmanager import Notification
from alert_intake.intake import Intake, Intended, Outcome
from alert_intake.mapping import AlertRefused
from config.metrics_text import CONTENT_TYPE, render
from worker.supervised_loop import health_report
from workflows.input_errors import explain

log = logging.getLogger("billing_remediation.alert_intake")
MAX_BODY_BYTES = 5_000_000


def _error(status: int, reason: str, **extra: object) -> JSONResponse:
    return JSONResponse({"error": reason, **extra}, status_code=status)


async def _webhook(request: Request) -> Response:
    """POST /alertmanager: validate every alert first, then start/attach/record; never half-applied."""
    intake: Intake = request.app.state.intake
    token: str = request.app.state.token
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    counts: Counter[str] = request.app.state.counts
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        counts["unauthorized"] += 1
        return _error(401, "missing or invalid bearer token")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        # Refused before reading: an oversized post never sits in memory.
        return _error(413, f"body is {declared} bytes; the limit is {MAX_BODY_BYTES}")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        return _error(413, f"body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        notification = Notification.model_validate(json.loads(body))
    except ValueError as err:  # JSONDecodeError and ValidationError are both ValueErrors
        if isinstance(err, ValidationError):
            return _error(422, f"not an Alertmanager v4 payload: {explain(err, 'body')}")
        return _error(400, f"body is not JSON: {err}")
    intended: list[Intended] = []
    ignored: list[Outcome] = []
    refused: list[dict[str, str]] = []
    try:
        for alert in notification.alerts:
            try:
                found = await intake.from_alert(alert)
            except AlertRefused as err:
                refused.append({"fingerprint": alert.fingerprint, "reason": str(err)})
                continue
            if found is None:
                name = alert.labels.get("alertname", "")
                ignored.append(
                    Outcome(alert.fingerprint, "ignored", detail=f"no route for alertname {name!r}")
                )
            else:
                intended.append(found)
        if refused:
            counts["refused"] += len(notification.alerts)
            return _error(422, "alerts refused; nothing was started", refused=refused)
        outcomes = await asyncio.gather(*(intake.deliver(i) for i in intended))
    except (RPCError, OSError, asyncpg.PostgresError) as err:
        # Alertmanager retries 5xx: a dependency outage delays the remediation, it does not lose it.
        log.warning("alert intake could not deliver: %s", err)
        counts["retry_later"] += len(notification.alerts)
        return _error(503, f"dependency unavailable ({type(err).__name__}); retry")
    counts.update(o.action for o in [*outcomes, *ignored])
    return JSONResponse({"results": [o.as_dict() for o in [*outcomes, *ignored]]})


async def _health(request: Request) -> Response:
    """Liveness of the receiver and of the NATS subscriber; 503 while the subscriber fails."""
    ok, loops = health_report(getattr(request.app.state, "loops", {}))
    return JSONResponse({"status": "ok" if ok else "failing", "loops": loops}, status_code=200 if ok else 503)


async def _metrics(request: Request) -> Response:
    """GET /metrics: alerts received, by what became of them."""
    received = CounterMetricFamily(
        "remediation_alerts_received", "Alerts received by the intake, by outcome", labels=["outcome"]
    )
    for outcome, n in sorted(request.app.state.counts.items()):
        received.add_metric([outcome], float(n))
    return Response(render([received]), media_type=CONTENT_TYPE)


def receiver_app(intake: Intake, token: str) -> Starlette:
    """The ASGI app: POST /alertmanager, GET /healthz and GET /metrics."""
    if not token:
        raise ValueError("ALERTS_TOKEN is required: the receiver never runs without auth")
    app = Starlette(
        routes=[
            Route("/alertmanager", _webhook, methods=["POST"]),
            Route("/healthz", _health),
            Route("/metrics", _metrics),
        ]
    )
    app.state.counts = Counter()
    app.state.intake = intake
    app.state.token = token
    return app
