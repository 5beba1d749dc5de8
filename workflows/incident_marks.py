"""The incident's moments the workflow saw (pure, replay-safe): failing log lines and alerts."""

from __future__ import annotations

from datetime import UTC, datetime

from contracts.models import AlertNotice, CheckResult, IncidentMark


def incident_marks(diagnosis: list[CheckResult], alerts: list[AlertNotice]) -> list[IncidentMark]:
    """First and last failing lines for the correlation id (Loki), and each alert's start and end."""
    marks: list[IncidentMark] = []
    for check in diagnosis:
        if check.check != "loki_logs":
            continue
        for key, event in (
            ("first_error_ns", "first failing log line for the correlation id"),
            ("last_error_ns", "last failing log line for the correlation id"),
        ):
            if key in check.counts:
                at = datetime.fromtimestamp(check.counts[key] / 1e9, UTC)
                marks.append(IncidentMark(at=at, source="loki", event=event))
    for alert in alerts:
        if alert.starts_at is not None:
            marks.append(
                IncidentMark(at=alert.starts_at, source=alert.source, event=f"{alert.name} {alert.status}")
            )
        if alert.ends_at is not None and alert.status == "resolved":
            marks.append(IncidentMark(at=alert.ends_at, source=alert.source, event=f"{alert.name} ended"))
    return marks
