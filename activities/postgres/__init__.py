"""Activities on the billing data in Postgres, one module per concern.

``drift_sql`` the four checks as SQL; ``diagnosis`` health, consistency, blast radius and duplicates;
``reconcile`` findings; ``plan`` plan actions; ``apply`` the approved plan; ``reversal`` the inverse of a run; ``records`` the remediation's
own rows (runs, timeline, approvals audit, snapshots, evidence). Every path maps driver failures to the
retryable DependencyDown through ``base.driver_errors``. Every check is set-based SQL; findings and plan
actions are written to Postgres, never returned whole.
"""

from __future__ import annotations

import asyncpg
from temporalio.client import Client

from activities.payment_provider import PaymentProvider
from activities.postgres.apply import ApplyActivities
from activities.postgres.diagnosis import DiagnosisActivities
from activities.postgres.plan import PlanActivities
from activities.postgres.reconcile import ReconcileActivities
from activities.postgres.reversal import ReversalActivities


class BillingDatabaseActivities(
    DiagnosisActivities, ReconcileActivities, PlanActivities, ApplyActivities, ReversalActivities
):
    """Set-based checks and corrective writes on the billing tables (all groups on one pool)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        temporal: Client | None = None,
        provider: PaymentProvider | None = None,
        summary_max_age_s: int = 900,
    ) -> None:
        super().__init__(pool)
        self._temporal = temporal
        self._provider = provider
        self._summary_max_age_s = summary_max_age_s


__all__ = ["BillingDatabaseActivities"]
