"""Approver pages: what the workflow asks Alertmanager to page, per tier, and when to resolve."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from contracts.models import Frozen, RunRef

PAGE_ALERT = "RemediationAwaitingApproval"


class ApproverPage(Frozen):
    """A plan waiting for approval, paged to ``tiers`` (each an alert with its ``tier`` label); ``resolve``
    ends every one of them (decided, expired, or the run ended)."""

    ref: RunRef
    plan_id: str
    tiers: list[str]  # "1", "2", ... and "all" once it reaches everyone
    approvers: dict[str, list[str]] = Field(default_factory=dict)  # tier -> approver names
    opened_at: datetime
    until: datetime  # the hard limit: the page stays active until then unless resolved
    resolve: bool = False
    blast_radius: str = ""
    action_count: int = 0
    money_moved_minor: int = 0
    approvals: int = 0
    approvals_needed: int = 1
    requested_by: str = ""
    approval_link: str = ""
