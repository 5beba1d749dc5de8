"""Turn alerts into remediations: start one per scope, attach repeats, record each alert once on the run."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

import remediation_client as operations
from alert_intake.alertmanager import Alert
from alert_intake.mapping import AlertRefused, Mapping
from config import Settings
from contracts import names
from contracts.models import AlertNotice, RemediationRequest, Trigger
from database.scope import ScopeRefused, validate_scope

log = logging.getLogger("billing_remediation.alert_intake")
Action = Literal[
    "started", "attached", "resolved_recorded", "no_running_remediation", "ignored", "handed_over"
]
GLOBAL_WORKFLOW_ID = RemediationRequest(correlation_id="x", requested_by="x").workflow_id()
REMEMBERED = 20_000  # recorded (run, alert, status) keys kept to skip repeat signals in a storm


@dataclass(frozen=True)
class Intended:
    """A validated alert: the remediation it belongs to and how it is recorded on the run."""

    request: RemediationRequest
    notice: AlertNotice


@dataclass(frozen=True)
class Outcome:
    """What the intake did with one alert (the receiver's response lists these)."""

    fingerprint: str
    action: Action
    workflow_id: str | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _when(value: datetime | None) -> datetime | None:
    # Alertmanager sends 0001-01-01T00:00:00Z as the end of a firing alert.
    return value if value is not None and value.year > 1 else None


class Intake:
    """Shared by the webhook receiver and the NATS subscriber."""

    def __init__(self, client: Client, settings: Settings, mapping: Mapping, db: asyncpg.Pool) -> None:
        self._client = client
        self._settings = settings
        self._mapping = mapping
        self._db = db
        self._locks: dict[str, asyncio.Lock] = {}
        self._recorded: OrderedDict[str, None] = OrderedDict()
        self._valid_scopes: set[str] = set()

    # ------------------------------------------------------------------ validation (no side effects)

    async def from_alert(self, alert: Alert) -> Intended | None:
        """The remediation an Alertmanager alert asks for; None when no route matches its name."""
        name = alert.labels.get("alertname", "")
        trigger = self._mapping.trigger_for(name)
        if trigger is None:
            return None
        request = self._mapping.request(
            trigger, alert.labels, default_correlation=f"alert-{alert.fingerprint}"[:128]
        )
        notice = AlertNotice(
            source="alertmanager",
            name=name[:200],
            status=alert.status,
            fingerprint=alert.fingerprint,
            starts_at=_when(alert.startsAt),
            ends_at=_when(alert.endsAt),
            correlation_id=request.correlation_id,
            summary=(alert.annotations.get("summary") or alert.annotations.get("description") or "")[:300],
        )
        await self._check_scope(request)
        return Intended(request, notice)

    async def from_event(self, subject: str, data: bytes) -> Intended:
        """The remediation a platform event (e.g. ``payments.reconcile_failed``) asks for."""
        try:
            event = json.loads(data)
        except ValueError:
            raise AlertRefused(f"{subject}: payload is not JSON ({data[:60]!r})") from None
        if not isinstance(event, dict):
            raise AlertRefused(f"{subject}: payload is not a JSON object")
        correlation = event.get("correlation_id")
        if not isinstance(correlation, str) or not correlation:
            raise AlertRefused(f"{subject}: correlation_id is missing")
        labels = {k: str(v) for k, v in event.items() if isinstance(v, str | int) and not isinstance(v, bool)}
        request = self._mapping.request(
            Trigger.RECONCILE_FAILED, labels, default_correlation=correlation, requested_by="nats-intake"
        )
        subject_key = event.get("payment_session_id") or correlation
        notice = AlertNotice(
            source="nats",
            name=subject[:200],
            status="firing",
            fingerprint=f"{subject}:{subject_key}"[:200],
            correlation_id=request.correlation_id,
            summary=f"{subject} for {subject_key}"[:300],
        )
        await self._check_scope(request)
        return Intended(request, notice)

    async def _check_scope(self, request: RemediationRequest) -> None:
        key = request.scope.key()
        if key in self._valid_scopes:
            return
        try:
            await validate_scope(self._db, request.scope)
        except ScopeRefused as err:
            raise AlertRefused(str(err)) from None
        self._valid_scopes.add(key)

    # ------------------------------------------------------------------ effects

    async def deliver(self, intended: Intended) -> Outcome:
        """Start or attach (firing) or record on the running run (resolved).

        While the platform-wide remediation runs, it covers every org: a scoped alert is recorded on it
        instead of starting a second remediation of the same drift beside it.
        """
        workflow_id = intended.request.workflow_id()
        notice = intended.notice
        # One start per scope at a time, so "started" vs "attached" is reported truthfully in a storm.
        lock = self._locks.setdefault(workflow_id, asyncio.Lock())
        async with lock:
            run_id = await self._running_run(workflow_id)
            if run_id is None and not intended.request.scope.is_global:
                covering = await self._running_run(GLOBAL_WORKFLOW_ID)
                if covering is not None:
                    await self._record(GLOBAL_WORKFLOW_ID, covering, notice)
                    action: Action = "resolved_recorded" if notice.status == "resolved" else "attached"
                    return Outcome(
                        notice.fingerprint,
                        action,
                        GLOBAL_WORKFLOW_ID,
                        detail="covered by the running platform-wide remediation",
                    )
            if notice.status == "resolved":
                if run_id is None:
                    return Outcome(notice.fingerprint, "no_running_remediation", workflow_id)
                await self._record(workflow_id, run_id, notice)
                return Outcome(notice.fingerprint, "resolved_recorded", workflow_id)
            handed = await self._handed_over(intended)
            if handed is not None:
                return handed
            started = await operations.start(self._client, self._settings, intended.request)
            await self._record(started.workflow_id, started.run_id, notice)
        action = "attached" if started.attached else "started"
        if action == "started":
            log.info(
                "started remediation %s for %s %s",
                workflow_id,
                notice.source,
                notice.name,
                extra={"correlation_id": intended.request.correlation_id, "workflow_id": workflow_id},
            )
        return Outcome(notice.fingerprint, action, workflow_id, started.ui_link)

    async def _handed_over(self, intended: Intended) -> Outcome | None:
        """A payment alert whose every failed session a finished run already handed to the payments team.

        Restarting would plan the same follow-ups again (each repeat of the alert one more run and one more
        evidence pack), so the alert is answered with the run that handed it over, until the follow-up is
        closed (the session leaves failed_reconcile) or the alert changes (a session not handed over fails).
        """
        request, notice = intended.request, intended.notice
        org = request.scope.org_id
        if request.trigger is not Trigger.RECONCILE_FAILED or org is None:
            return None
        sessions = [notice.fingerprint.partition(":")[2]] if notice.source == "nats" else None
        row = await self._db.fetchrow(
            """WITH failed AS (
                   SELECT s.id FROM billing.payment_sessions s
                   WHERE s.org_id = $1 AND s.status = 'failed_reconcile'
                     AND ($2::text[] IS NULL OR s.id = ANY($2::text[]))),
               handed AS (
                   SELECT f.id, r.workflow_id, r.run_id, r.ended_at FROM failed f
                   JOIN remediation.applied_actions a
                     ON a.idempotency_key = 'payment-investigate:' || f.id AND a.outcome = 'follow_up'
                   JOIN remediation.plans p ON p.plan_id = a.plan_id
                   JOIN remediation.runs r ON r.run_id = p.run_id AND r.ended_at IS NOT NULL)
               SELECT (SELECT count(*) FROM failed) AS failed,
                      (SELECT count(DISTINCT id) FROM handed) AS handed,
                      (SELECT workflow_id || ' (run ' || run_id || ')' FROM handed ORDER BY ended_at DESC LIMIT 1)
                          AS by_run,
                      (SELECT string_agg(DISTINCT id, ', ') FROM handed) AS ids""",
            org,
            sessions,
        )
        if row is None or not row["failed"] or row["handed"] < row["failed"]:
            return None
        detail = (
            f"payment sessions {row['ids']} were handed to the payments team by {row['by_run']}; not"
            " restarted until the follow-up is closed or another session fails"
        )
        log.info(
            "%s for %s: handed over, not restarted",
            notice.name,
            org,
            extra={"correlation_id": request.correlation_id, "workflow_id": request.workflow_id()},
        )
        return Outcome(notice.fingerprint, "handed_over", request.workflow_id(), detail=detail)

    async def _running_run(self, workflow_id: str) -> str | None:
        try:
            description = await self._client.get_workflow_handle(workflow_id).describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return None
            raise
        return description.run_id if description.status == WorkflowExecutionStatus.RUNNING else None

    async def _record(self, workflow_id: str, run_id: str, notice: AlertNotice) -> None:
        key = f"{run_id}:{notice.key()}"
        if key in self._recorded:
            return
        try:
            await self._client.get_workflow_handle(workflow_id, run_id=run_id).signal(
                names.SIGNAL_ALERT, notice
            )
        except RPCError as err:
            # The run finished between start and signal: nothing left to record it on.
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
        self._recorded[key] = None
        while len(self._recorded) > REMEMBERED:
            self._recorded.popitem(last=False)
