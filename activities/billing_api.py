"""Admin billing API adapter: freeze/unfreeze adjustments, clear restrictions, worker restart hook, launch guard."""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import ValidationError
from temporalio import activity

from activities.errors import bad_input, dependency_down
from activities.http_errors import json_object, raise_for, send
from contracts import names
from contracts.models import (
    RESTART_HOOK_PATH,
    ROLLBACK_HOOK_PATH,
    ApiActionRequest,
    ApiActionResult,
    FreezeRequest,
    LaunchProbe,
    PostureObservation,
    PrecheckObservation,
    RunRef,
    SubmitObservation,
    WorkerDeployments,
    hook_words,
)

SYSTEM = "admin billing API"


class BillingApiActivities:
    """Calls the platform's admin billing API with the configured bearer token (never logged)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        restart_hook_url: str | None = None,
        rollback_hook_url: str | None = None,
    ) -> None:
        self._client = client
        self._restart_hook_url = restart_hook_url
        self._rollback_hook_url = rollback_hook_url

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
        self._same_hook(request, self._restart_hook_url, RESTART_HOOK_PATH)
        body = await self._call(
            "POST",
            self._restart_hook_url or RESTART_HOOK_PATH,
            json={"actor": f"remediation:{request.actor}", "correlation_id": request.ref.correlation_id},
        )
        return ApiActionResult(outcome="applied", detail=f"worker {body.get('mode', 'restarted')}")

    @activity.defn(name=names.ROLLBACK_BILLING_WORKER)
    async def rollback_billing_worker(self, request: ApiActionRequest) -> ApiActionResult:
        """Roll the billing worker back to the approved revision through the configured hook."""
        if request.action.target_revision is None:
            raise bad_input(f"plan action {request.action.seq}: a rollback needs its target revision")
        self._same_hook(request, self._rollback_hook_url, ROLLBACK_HOOK_PATH)
        body = await self._call(
            "POST",
            self._rollback_hook_url or ROLLBACK_HOOK_PATH,
            json={
                "to_revision": request.action.target_revision,
                "actor": f"remediation:{request.actor}",
                "idempotency_key": request.action.idempotency_key,
                "correlation_id": request.ref.correlation_id,
            },
        )
        current = (body.get("current") or {}).get("version", "?")
        outcome = "already_applied" if body.get("duplicate") else "applied"
        return ApiActionResult(outcome=outcome, detail=f"worker runs {current}")

    @staticmethod
    def _same_hook(request: ApiActionRequest, configured: str | None, default_path: str) -> None:
        """Refuse to call a hook other than the one the approvers signed (configuration changed since)."""
        signed, now = request.action.hook, hook_words(configured, default_path)
        if signed is not None and signed != now:
            raise bad_input(
                f"plan action {request.action.seq}: the approved plan calls {signed}, but this worker is"
                f" configured with {now}; nothing was called (re-plan to approve the new hook)"
            )

    @activity.defn(name=names.READ_WORKER_DEPLOYMENTS)
    async def read_worker_deployments(self, ref: RunRef) -> WorkerDeployments:
        """The billing worker's current and previous revisions, with their rollout times."""
        body = await self._call("GET", "/api/v1/admin/billing-worker/deployments")
        try:
            return WorkerDeployments(current=body["current"], previous=body.get("previous"))
        except (KeyError, ValidationError) as exc:
            raise dependency_down(f"{SYSTEM}: unexpected deployments answer: {exc}") from None

    @staticmethod
    def _launch_headers(probe: LaunchProbe) -> dict[str, str]:
        # The runbook scopes launches by project; the org is the fallback when no project is named.
        if probe.project_id:
            return {"X-Project-ID": probe.project_id, "X-Correlation-ID": probe.correlation_id}
        return {"X-Org-ID": probe.org_id, "X-Correlation-ID": probe.correlation_id}

    @activity.defn(name=names.READ_POSTURE)
    async def read_posture(self, probe: LaunchProbe) -> PostureObservation:
        """GET the financial posture (of the project's org when a project is named)."""
        body = await self._call(
            "GET", "/api/v1/billing/financial-posture", headers=self._launch_headers(probe)
        )
        effects = body.get("effects") or {}
        try:
            return PostureObservation(
                org_id=body["org_id"],
                state=body["state"],
                reason=body.get("reason"),
                block_new_launches=effects.get("block_new_launches") is True,
                balance_minor=body.get("balance_minor"),
            )
        except (KeyError, ValidationError) as exc:
            raise dependency_down(f"{SYSTEM} financial posture has an unexpected shape: {exc}") from None

    @activity.defn(name=names.RUN_PRECHECK)
    async def run_precheck(self, probe: LaunchProbe) -> PrecheckObservation:
        """POST the launch precheck for the SKU and keep its `billing` check."""
        body = await self._call(
            "POST",
            "/api/v1/v3/launch/compute/precheck",
            json={"sku": probe.sku},
            headers=self._launch_headers(probe),
        )
        checks = body.get("checks")
        billing = next(
            (c for c in checks or [] if isinstance(c, dict) and c.get("id") == "billing"),
            None,
        )
        if billing is None:
            # A precheck without a billing check cannot prove anything either way.
            return PrecheckObservation(
                sku=probe.sku, billing_severity=None, billing_reason="no billing check"
            )
        return PrecheckObservation(
            sku=probe.sku, billing_severity=billing.get("severity"), billing_reason=billing.get("reason")
        )

    @activity.defn(name=names.PROBE_SUBMIT)
    async def probe_submit(self, probe: LaunchProbe) -> SubmitObservation:
        """POST a launch expecting 402 insufficient_balance; any answer is an observation, not an error."""
        response = await send(
            self._client,
            SYSTEM,
            "POST",
            "/api/v1/v3/launch/compute",
            json={"sku": probe.sku, "idempotency_key": f"launch-guard-probe:{probe.correlation_id}"},
            headers=self._launch_headers(probe),
        )
        if response.status_code in (401, 403, 429) or response.status_code >= 500:
            raise_for(SYSTEM, response)
        code: str | None = None
        try:
            body = response.json()
            if isinstance(body, dict):
                error = body.get("error")
                code = error.get("code") if isinstance(error, dict) else body.get("code")
        except ValueError:
            code = None
        return SubmitObservation(status_code=response.status_code, code=code)
