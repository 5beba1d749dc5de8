"""Alertmanager adapter: recovery criterion 4 ("alerts return below threshold") from the real alert state.

`GET /api/v2/alerts` with matchers for the runbook's alert names and the run's scope labels. A scoped
run counts the alerts about its scope (each of its scope fields carried as a label with the same value);
a platform-wide run counts every runbook alert. Unreachable is "unknown", never a pass.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.http_errors import raise_for, send
from contracts import names
from contracts.models import AlertCheckRequest, AlertCheckResult, Criterion, Scope

CRITERION = "alerts_below_threshold"
HANDED_OVER_ALERT = "PaymentsReconcileFailed"
# Scope field -> the alert label carrying it (alerting/rules and alert_intake/alert_mapping.toml).
SCOPE_LABELS = {
    "org_id": "org_id",
    "project_id": "project_id",
    "user_id": "user_id",
    "allocation_id": "allocation_id",
}


def matchers(scope: Scope) -> list[str]:
    """Alertmanager filter matchers: the runbook's alert names and, for a scoped run, its scope labels."""
    found = ["alertname=~" + json.dumps("|".join(names.RUNBOOK_ALERTS))]
    for field, label in SCOPE_LABELS.items():
        value = getattr(scope, field)
        if value:
            found.append(f"{label}={json.dumps(value)}")
    return found


def describe(alert: dict[str, Any]) -> str:
    """``BillingWorkerDown{org_id="acme"} since 2026-11-30T02:01:00Z``: which alert, about what, since when."""
    labels = alert.get("labels", {})
    scoped = ",".join(f'{label}="{labels[label]}"' for label in SCOPE_LABELS.values() if label in labels)
    since = str(alert.get("startsAt", ""))[:19] + "Z" if alert.get("startsAt") else "?"
    return f"{labels.get('alertname', '?')}{{{scoped}}} since {since}"


class AlertmanagerActivities:
    """Reads the alert state from Alertmanager's API."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    @activity.defn(name=names.CHECK_ALERTS)
    async def check_alerts(self, request: AlertCheckRequest) -> AlertCheckResult:
        """Criterion 4: no runbook alert about the run's scope fires in Alertmanager."""
        where = str(self._http.base_url).rstrip("/")
        params: list[tuple[str, str]] = [("active", "true"), ("silenced", "false"), ("inhibited", "false")]
        params += [("filter", m) for m in matchers(request.ref.scope)]
        try:
            response = await send(self._http, "Alertmanager", "GET", "/api/v2/alerts", params=params)
            raise_for("Alertmanager", response)
            alerts = response.json()
            if not isinstance(alerts, list):
                raise ValueError(f"expected a list of alerts, got {type(alerts).__name__}")
        except (ApplicationError, ValueError) as err:
            detail = f"unknown: Alertmanager at {where} did not answer ({err})"[:500]
            return AlertCheckResult(criterion=Criterion(name=CRITERION, passed=False, detail=detail))
        # A failed payment this run handed to the payments team keeps its org's alert firing: named,
        # not counted against the recovery (as the follow-up is not counted as unresolved drift).
        handed = [
            a
            for a in alerts
            if a.get("labels", {}).get("alertname") == HANDED_OVER_ALERT
            and a.get("labels", {}).get("org_id") in request.handed_over_orgs
        ]
        firing = sorted(describe(a) for a in alerts if a not in handed)
        handed_over = sorted(describe(a) for a in handed)
        active = {str(a.get("fingerprint")) for a in alerts}
        resolved = [f for f in request.recorded_firing if f not in active]
        scope = request.ref.scope.describe()
        if firing:
            detail = f"firing in Alertmanager for {scope}: " + "; ".join(firing[:10])
            if len(firing) > 10:
                detail += f"; and {len(firing) - 10} more"
        else:
            detail = f"no runbook alert firing for {scope} (Alertmanager at {where})"
        if handed_over:
            detail += "; still firing, handed to the payments team (follow-ups): " + "; ".join(
                handed_over[:10]
            )
        return AlertCheckResult(
            criterion=Criterion(name=CRITERION, passed=not firing, detail=detail[:1000]),
            firing=firing,
            handed_over=handed_over,
            resolved_in_alertmanager=resolved,
        )
