"""The worker's configuration as seen by the workflow (approval policy, thresholds)."""

from __future__ import annotations

from temporalio import activity

from config import Settings
from config.approver_keys import read_public_key
from contracts import names
from contracts.models import (
    RESTART_HOOK_PATH,
    ROLLBACK_HOOK_PATH,
    ApprovalPolicy,
    ApproverInfo,
    RuntimeOptions,
    hook_words,
)


def runtime_options(settings: Settings) -> RuntimeOptions:
    """Settings → the options a workflow needs (public keys only, never secrets)."""
    policy = ApprovalPolicy(
        approvers=[
            ApproverInfo(
                name=a.name,
                role=a.role,
                tier=a.tier,
                public_key=a.public_key or read_public_key(settings.resolved_keys_dir(), a.name),
            )
            for a in settings.approvers
        ],
        require_signatures=settings.approval_signatures == "required",
        quorum=settings.approval_quorum,
        money_threshold_minor=settings.approval_money_threshold_minor,
        rows_threshold=settings.approval_rows_threshold,
        deadline_seconds=settings.approval_deadline_seconds,
        hard_limit_seconds=settings.approval_hard_limit_seconds,
    )
    return RuntimeOptions(
        policy=policy,
        verify_window_seconds=settings.verify_window_seconds,
        widespread_org_threshold=settings.widespread_org_threshold,
        apply_batch_size=settings.apply_batch_size,
        activity_timeout_seconds=settings.activity_timeout_seconds,
        heartbeat_seconds=settings.heartbeat_seconds,
        retry_max_interval_seconds=settings.retry_max_interval_seconds,
        provider_wait_seconds=settings.payment_provider_wait_seconds,
        consumer_pending_threshold=settings.consumer_pending_threshold,
        alert_resolved_wait_seconds=settings.alert_resolved_wait_seconds,
        restart_hook=hook_words(settings.worker_restart_hook_url, RESTART_HOOK_PATH),
        rollback_hook=hook_words(settings.worker_rollback_hook_url, ROLLBACK_HOOK_PATH),
        approval_page_url=settings.resolved_approvals_public_url(),
        plan_from_watch=settings.plan_from_watch,
    )


class ConfigActivities:
    """Hands the loaded settings to workflows through history (recorded once per run)."""

    def __init__(self, settings: Settings) -> None:
        self._options = runtime_options(settings)

    @activity.defn(name=names.LOAD_RUNTIME_OPTIONS)
    async def load_runtime_options(self) -> RuntimeOptions:
        """The approval policy and thresholds in force on this worker."""
        return self._options
