"""Approver pages through Alertmanager: `POST /api/v2/alerts`, one alert per tier paged.

Each alert carries the tier as a label (Alertmanager routes it to that tier's receivers: email, a
webhook, Slack, PagerDuty) and what an approver needs in its annotations, with the approval page link
that opens this plan. It stays active until the hard limit; resolving posts it again ending now, so the
receivers get "resolved". Posting directly adds only the route's group_wait before the first page.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from temporalio import activity

from activities.http_errors import raise_for, send
from contracts import names
from contracts.models import format_money
from contracts.pages import PAGE_ALERT, ApproverPage


def page_alerts(page: ApproverPage, now: datetime) -> list[dict[str, Any]]:
    """The alerts Alertmanager receives for ``page`` (one per tier).

    Times are clamped to Alertmanager's clock (``now``): a workflow's clock may run ahead of it (the
    time-skipping test server), and a resolution must end the alert now, not at the workflow's time.
    """
    scope = page.ref.scope.key()
    starts = min(page.opened_at, now)
    ends = now if page.resolve else max(page.until, now + timedelta(minutes=5))
    alerts = []
    for tier in page.tiers:
        who = ", ".join(page.approvers.get(tier, [])) or "every approver"
        alerts.append(
            {
                "labels": {
                    "alertname": PAGE_ALERT,
                    "workflow_id": page.ref.workflow_id,
                    "scope": scope,
                    "tier": tier,
                    "severity": "page",
                },
                "annotations": {
                    "summary": f"Approve or reject remediation {page.ref.workflow_id} ({scope})",
                    "description": (
                        f"Plan {page.plan_id}: {page.action_count} actions, money moved"
                        f" {format_money(page.money_moved_minor)} (minor units {page.money_moved_minor}),"
                        f" blast radius {page.blast_radius or 'unknown'}; approvals {page.approvals} of"
                        f" {page.approvals_needed}; requested by {page.requested_by}. Tier {tier}: {who}."
                    ),
                    "approval_link": page.approval_link,
                    "blast_radius": page.blast_radius,
                    "approvals": f"{page.approvals} of {page.approvals_needed}",
                    "requested_by": page.requested_by,
                    "correlation_id": page.ref.correlation_id,
                },
                "startsAt": starts.isoformat(),
                "endsAt": ends.isoformat(),
                "generatorURL": page.approval_link or "",
            }
        )
    return alerts


class ApproverPageActivities:
    """Pages approvers through Alertmanager's API."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    @activity.defn(name=names.PAGE_APPROVERS)
    async def page_approvers(self, page: ApproverPage) -> int:
        """Post (or resolve) the plan's page for each tier; returns the alerts posted."""
        alerts = page_alerts(page, datetime.now(UTC))
        response = await send(self._http, "Alertmanager", "POST", "/api/v2/alerts", json=alerts)
        raise_for("Alertmanager", response)
        return len(alerts)
