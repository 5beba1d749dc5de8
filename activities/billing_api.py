"""Admin billing API adapter: freeze/unfreeze adjustments, clear restrictions, worker restart hook, launch guard."""

from __future__ import annotations

from typing import Any

import httpx
from temporalio import activity

from activities.http_errors import json_object, raise_for, send
from workflows import names
from workflows.models import (
    ApiActionRequest,
    ApiActionResult,
    Criterion,
    FreezeRequest,
    LaunchGuardRequest,
)

SYSTEM = "admin billing API"


class BillingApiActivities:
    """Calls the platform's admin billing API with the configured bearer token (never logged)."""

    def __init__(self, client: httpx.AsyncClient, restart_hook_url: str | None = None) -> None:
        self._client = client
        self._restart_hook_url = restart_hook_url

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = await send(self._client, SYSTEM, method, path, **kwargs)
        raise_for(SYSTEM, response)
        return json_object(SYSTEM, response)

    @activity.defn(name=names.FREEZE_ADJUSTMENTS)
    async def freeze_adjustments(self, request: FreezeRequest) -> None:
        """Freeze risky manual adjustments for the scope (idempotent per freeze id)."""
        await self._call(
            "POST",
            "/api/v1/admin/billing/adjustments/freeze",
            json={
                "freeze_id": request.freeze_id,
                "scope_key": request.ref.scope.key(),
                "reason": request.reason,
                "actor": f"remediation:{request.actor}",
                "correlation_id": request.ref.correlation_id,
            },
        )

    @activity.defn(name=names.UNFREEZE_ADJUSTMENTS)
    async def unfreeze_adjustments(self, request: FreezeRequest) -> None:
        """Lift the freeze (idempotent)."""
        await self._call(
            "POST",
            "/api/v1/admin/billing/adjustments/unfreeze",
            json={"freeze_id": request.freeze_id, "actor": f"remediation:{request.actor}"},
        )

    @activity.defn(name=names.CLEAR_RESTRICTION)
    async def clear_restriction(self, request: ApiActionRequest) -> ApiActionResult:
        """Clear an org's prepaid-depletion restriction (approved plan action; idempotency key sent)."""
        body = await self._call(
            "POST",
            f"/api/v1/admin/billing/restrictions/{request.action.org_id}/clear",
            json={
                "mode": "clear",
                "actor": f"remediation:{request.actor}",
                "idempotency_key": request.action.idempotency_key,
                "correlation_id": request.ref.correlation_id,
                "approvers": request.approvers,
            },
        )
        outcome = "already_applied" if body.get("duplicate") else "applied"
        return ApiActionResult(outcome=outcome, detail=f"state now {body.get('state')}")

    @activity.defn(name=names.RESTART_BILLING_WORKER)
    async def restart_billing_worker(self, request: ApiActionRequest) -> ApiActionResult:
        """Restart the billing worker through the configured hook."""
        path = self._restart_hook_url or "/api/v1/admin/billing-worker/restart"
        body = await self._call(
            "POST",
            path,
            json={"actor": f"remediation:{request.actor}", "correlation_id": request.ref.correlation_id},
        )
        return ApiActionResult(outcome="applied", detail=f"worker {body.get('mode', 'restarted')}")

    @activity.defn(name=names.CHECK_LAUNCH_GUARD)
    async def check_launch_guard(self, request: LaunchGuardRequest) -> Criterion:
        """Financial posture and launch precheck against the runbook's expected state."""
        posture = await self._call(
            "GET", "/api/v1/billing/financial-posture", headers={"X-Org-ID": request.org_id}
        )
        precheck = await self._call(
            "POST",
            "/api/v1/v3/launch/compute/precheck",
            json={"sku": request.sku},
            headers={"X-Org-ID": request.org_id},
        )
        billing = next(
            (c for c in precheck.get("checks", []) if isinstance(c, dict) and c.get("id") == "billing"), {}
        )
        severity = billing.get("severity")
        effects = posture.get("effects") or {}
        if request.expect == "restricted":
            passed = (
                posture.get("state") == "restricted"
                and posture.get("reason") == "prepaid_balance_depleted"
                and effects.get("block_new_launches") is True
                and severity == "blocker"
            )
        else:
            passed = posture.get("state") != "restricted" and severity == "ok"
        return Criterion(
            name="launch_guard_" + request.expect,
            passed=passed,
            detail=f"state={posture.get('state')} reason={posture.get('reason')} "
            f"block_new_launches={effects.get('block_new_launches')} precheck billing={severity}",
        )
