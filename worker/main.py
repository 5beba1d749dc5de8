"""Build clients from settings, register workflow and activities, run until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from temporalio.client import Client
from temporalio.worker import Worker

import remediation_client as operations
from activities.alertmanager import AlertmanagerActivities
from activities.approver_pages import ApproverPageActivities
from activities.billing_api import BillingApiActivities
from activities.loki import LokiActivities
from activities.nats_jetstream import NatsActivities
from activities.payment_checks import PaymentCheckActivities
from activities.payment_provider import StripePaymentProvider
from activities.postgres import BillingDatabaseActivities
from activities.postgres.records import RecordsActivities
from activities.postgres.watch import WatchDatabaseActivities
from activities.runtime_config import ConfigActivities
from activities.tempo import TempoActivities
from activities.watch_events import WatchEventActivities
from activities.watch_starts import StartOrJoin, WatchStartActivities
from activities.worker_regression import WorkerRegressionActivities
from config import Settings
from config.approver_keys import load_private_key
from contracts.models import AlertNotice, RemediationRequest
from migrations import apply_migrations, remediation_migrations_dir
from worker.activity_context import RemediationContext
from worker.connection import connect_temporal
from worker.deployment import build_id, deployment_config
from worker.metrics import sdk_runtime, serving_metrics
from worker.platform_summary_refresh import refresh_platform_summary_every
from worker.serving import stop_event
from workflows.drift_watch import DriftWatchWorkflow
from workflows.launch_guard import LaunchGuardWorkflow
from workflows.remediation import BillingRemediationWorkflow
from workflows.sandbox import workflow_runner

log = logging.getLogger(__name__)


@dataclass
class Resources:
    """Clients shared by all activities of one worker process."""

    pool: asyncpg.Pool
    http_api: httpx.AsyncClient
    http_loki: httpx.AsyncClient
    http_tempo: httpx.AsyncClient
    http_alertmanager: httpx.AsyncClient
    nats: NatsActivities
    provider: StripePaymentProvider
    watch_events: WatchEventActivities


async def migrate_remediation_schema(pool: asyncpg.Pool) -> list[str]:
    """Create or upgrade the remediation schema."""
    async with pool.acquire() as conn:
        return await apply_migrations(conn, remediation_migrations_dir(), component="remediation")


@contextlib.asynccontextmanager
async def resources(settings: Settings) -> AsyncIterator[Resources]:
    """Open every client once; close them all on exit."""
    pool = await asyncpg.create_pool(
        settings.resolved_database_url(), min_size=1, max_size=10, command_timeout=300
    )
    await migrate_remediation_schema(pool)
    timeout = httpx.Timeout(settings.http_timeout_seconds)
    token = settings.billing_api_token.get_secret_value()
    http_api = httpx.AsyncClient(
        base_url=settings.resolved_billing_api_url(),
        timeout=timeout,
        headers={"Authorization": f"Bearer {token}"},
    )
    http_loki = httpx.AsyncClient(base_url=settings.resolved_loki_url(), timeout=timeout)
    http_tempo = httpx.AsyncClient(base_url=settings.resolved_tempo_url(), timeout=timeout)
    http_alertmanager = httpx.AsyncClient(base_url=settings.resolved_alertmanager_url(), timeout=timeout)
    nats_acts = NatsActivities(
        settings.resolved_nats_url(),
        settings.billing_stream,
        settings.billing_consumer,
        settings.consumer_pending_threshold,
    )
    provider = payment_provider(settings)
    watch_events = WatchEventActivities(
        settings.resolved_nats_url(), settings.billing_stream, settings.billing_consumer, pool
    )
    try:
        yield Resources(
            pool, http_api, http_loki, http_tempo, http_alertmanager, nats_acts, provider, watch_events
        )
    finally:
        await nats_acts.close()
        await watch_events.close()
        await provider.aclose()
        for client in (http_api, http_loki, http_tempo, http_alertmanager):
            await client.aclose()
        await pool.close()


def payment_provider(settings: Settings) -> StripePaymentProvider:
    """The payment provider client from settings (the key stays in the client, never in history)."""
    return StripePaymentProvider(
        settings.resolved_payment_provider_url(),
        settings.payment_provider_api_key.get_secret_value(),
        retries=settings.payment_provider_retries,
        timeout=settings.http_timeout_seconds,
    )


def evidence_signer(settings: Settings) -> Ed25519PrivateKey | None:
    """The evidence-signing key, if there is one (packs are marked unsigned otherwise, and fail verification)."""
    path = settings.resolved_evidence_key_file()
    if not path.exists():
        log.warning("no evidence signing key at %s: evidence packs will be unsigned", path)
        return None
    return load_private_key(path)


def activity_list(
    settings: Settings, res: Resources, temporal: Client | None = None
) -> Sequence[Callable[..., Any]]:
    """Every activity, bound to its system's client."""
    db = BillingDatabaseActivities(
        res.pool, temporal, res.provider, settings.platform_summary_max_age_seconds
    )
    records = RecordsActivities(res.pool, evidence_signer(settings))
    loki = LokiActivities(res.http_loki, settings.loki_tenant)
    payments = PaymentCheckActivities(res.pool, res.provider, loki, settings.payment_provider_concurrency)
    tempo = TempoActivities(res.http_tempo, settings.tempo_tenant)
    api = BillingApiActivities(
        res.http_api, settings.worker_restart_hook_url, settings.worker_rollback_hook_url
    )
    regression = WorkerRegressionActivities(api, loki)
    alerts = AlertmanagerActivities(res.http_alertmanager)
    pages = ApproverPageActivities(res.http_alertmanager)
    cfg = ConfigActivities(settings)
    watch_db = WatchDatabaseActivities(res.pool)
    watch_starts = WatchStartActivities(res.pool, starter(temporal, settings))
    return [
        cfg.load_runtime_options,
        records.register_run,
        records.record_timeline,
        records.record_approval,
        records.record_api_action,
        records.snapshot_scope,
        records.capture_evidence,
        records.finish_run,
        db.check_postgres,
        db.check_outbox,
        db.check_data_consistency,
        db.assess_blast_radius,
        db.reconcile,
        db.build_plan,
        db.read_plan_balances,
        db.build_reversal_plan,
        db.verify_reversal,
        db.apply_plan,
        db.check_duplicates,
        payments.check_payment_findings,
        payments.prefetch_provider_answers,
        payments.check_remediation_credits,
        res.nats.check_consumer,
        res.nats.read_event_sequence,
        res.nats.publish_escalation,
        loki.query_correlation_logs,
        tempo.summarize_trace,
        api.freeze_adjustments,
        api.unfreeze_adjustments,
        api.clear_restriction,
        api.restart_billing_worker,
        api.rollback_billing_worker,
        api.read_worker_deployments,
        regression.check_worker_regression,
        alerts.check_alerts,
        pages.page_approvers,
        api.read_posture,
        api.run_precheck,
        api.probe_submit,
        watch_db.plan_tick,
        watch_db.check_changed_keys,
        watch_db.full_pass,
        watch_db.finish_tick,
        res.watch_events.collect_changed_keys,
        res.watch_events.catch_up,
        watch_starts.act_on_drift,
    ]


def starter(client: Client | None, settings: Settings) -> StartOrJoin | None:
    """How the drift watch starts or joins a remediation: the client's own signal-with-start."""
    if client is None:
        return None
    temporal = client

    async def start_or_join(request: RemediationRequest, notice: AlertNotice) -> tuple[str, bool]:
        started = await operations.start(temporal, settings, request, notice)
        return started.workflow_id, started.attached

    return start_or_join


def build_worker(
    client: Client, settings: Settings, res: Resources, *, task_queue: str | None = None
) -> Worker:
    """The worker for the remediation task queue."""
    return Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=[BillingRemediationWorkflow, LaunchGuardWorkflow, DriftWatchWorkflow],
        workflow_runner=workflow_runner(),
        interceptors=[RemediationContext()],
        activities=activity_list(settings, res, client),
        max_concurrent_activities=50,
        graceful_shutdown_timeout=timedelta(seconds=10),
        deployment_config=deployment_config(settings),
    )


async def run_worker(settings: Settings) -> None:
    """Entry point of `remediate worker`: run until SIGINT/SIGTERM, then shut down gracefully."""
    client = await connect_temporal(settings, sdk_runtime(settings))
    async with resources(settings) as res, serving_metrics(res.pool, client, settings):
        worker = build_worker(client, settings, res)
        stop = stop_event()
        log.info(
            "worker polling task queue %s (%s)",
            settings.task_queue,
            f"deployment {settings.worker_deployment_name}, build {build_id(settings)}"
            if settings.worker_versioning == "on"
            else "unversioned",
        )
        refresh = (
            asyncio.create_task(
                refresh_platform_summary_every(res.pool, settings.platform_summary_refresh_seconds)
            )
            if settings.platform_summary_refresh_seconds
            else None
        )
        try:
            async with worker:
                await stop.wait()
        finally:
            if refresh is not None:
                refresh.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresh
