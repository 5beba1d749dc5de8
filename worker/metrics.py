"""The remediation worker's Prometheus metrics (GET /metrics on WORKER_METRICS_PORT).

Runs by phase and plans waiting for approval come from Temporal's visibility (this worker's task
queue); runs ended, actions by outcome and the platform drift summary from Postgres. Computed at each
scrape. The SDK's own figures (activity failures by type, task latencies) are served by the Temporal
runtime's Prometheus exporter on TEMPORAL_SDK_METRICS_PORT (see ``sdk_runtime``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from temporalio.client import Client
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from config import Settings
from config.metrics_text import CONTENT_TYPE, render
from contracts import names
from contracts.models import Phase
from worker.serving import serving
from worker.watch_metrics import watch_families
from workflows.search_attributes import SA_CORRELATION, SA_PHASE

log = logging.getLogger(__name__)


def sdk_runtime(settings: Settings) -> Runtime | None:
    """A Temporal runtime exporting the SDK's metrics for Prometheus, or None when turned off."""
    if not settings.temporal_sdk_metrics_port:
        return None
    address = f"{settings.metrics_host}:{settings.temporal_sdk_metrics_port}"
    try:
        return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=address)))
    except ValueError as err:
        # Metrics are not worth a worker that does not start: say so and run without them.
        log.warning("Temporal SDK metrics off: %s (TEMPORAL_SDK_METRICS_PORT)", err)
        return None


async def _running(client: Client, task_queue: str, pool: asyncpg.Pool) -> list[Metric]:
    by_phase: Counter[str] = Counter()
    waiting = GaugeMetricFamily(
        "remediation_awaiting_approval_seconds",
        "How long each plan has waited for approval",
        labels=["workflow_id", "correlation_id"],
    )
    query = (
        f"WorkflowType = '{names.WORKFLOW}' AND ExecutionStatus = 'Running' AND TaskQueue = '{task_queue}'"
    )
    now = datetime.now(UTC)
    async for wf in client.list_workflows(query):
        phase = wf.typed_search_attributes.get(SA_PHASE) or "started"
        by_phase[phase] += 1
        if phase == Phase.AWAITING_APPROVAL.value:
            since = await pool.fetchval(
                "SELECT max(created_at) FROM remediation.plans WHERE run_id = $1", wf.run_id
            )
            if since is not None:
                waiting.add_metric(
                    [wf.id, wf.typed_search_attributes.get(SA_CORRELATION) or ""],
                    (now - since).total_seconds(),
                )
    runs = GaugeMetricFamily("remediation_runs", "Running remediations by phase", labels=["phase"])
    for phase in (p for p in Phase if not p.ended):
        runs.add_metric([phase.value], float(by_phase.get(phase.value, 0)))
    return [runs, waiting]


async def _recorded(pool: asyncpg.Pool) -> list[Metric]:
    ended = CounterMetricFamily(
        "remediation_runs_ended", "Remediations ended, by outcome", labels=["outcome"]
    )
    for row in await pool.fetch(
        "SELECT outcome, count(*) AS n FROM remediation.runs WHERE ended_at IS NOT NULL GROUP BY outcome"
    ):
        ended.add_metric([row["outcome"] or "unknown"], float(row["n"]))
    actions = CounterMetricFamily(
        "remediation_actions", "Plan actions by outcome (applied, skipped, follow-up)", labels=["outcome"]
    )
    for row in await pool.fetch(
        "SELECT outcome, count(*) AS n FROM remediation.applied_actions GROUP BY outcome"
    ):
        actions.add_metric([row["outcome"]], float(row["n"]))
    families: list[Metric] = [ended, actions]
    summary = await pool.fetchrow(
        """SELECT drift_by_kind, orgs_with_drift, extract(epoch FROM now() - measured_at) AS age
           FROM remediation.platform_summaries ORDER BY measured_at DESC LIMIT 1"""
    )
    if summary is not None:
        drift = GaugeMetricFamily(
            "billing_platform_drift_entities",
            "Drifted entities in the latest platform summary",
            labels=["kind"],
        )
        for kind, n in json.loads(summary["drift_by_kind"]).items():
            drift.add_metric([kind], float(n))
        orgs = GaugeMetricFamily(
            "billing_platform_drift_orgs", "Orgs with drift in the latest platform summary"
        )
        orgs.add_metric([], float(summary["orgs_with_drift"]))
        age = GaugeMetricFamily("billing_platform_summary_age_seconds", "Age of the latest platform summary")
        age.add_metric([], float(summary["age"]))
        families += [drift, orgs, age]
    return families


def metrics_app(pool: asyncpg.Pool, client: Client, settings: Settings) -> Starlette:
    """The ASGI app serving GET /metrics."""

    async def metrics(request: Request) -> Response:
        deadline = GaugeMetricFamily(
            "remediation_approval_deadline_seconds",
            "How long a plan may wait for approval (APPROVAL_DEADLINE_SECONDS)",
        )
        deadline.add_metric([], float(settings.approval_deadline_seconds))
        families = [
            deadline,
            *await _running(client, settings.task_queue, pool),
            *await _recorded(pool),
            *await watch_families(pool),
        ]
        return Response(render(families), media_type=CONTENT_TYPE)

    return Starlette(routes=[Route("/metrics", metrics)])


@contextlib.asynccontextmanager
async def serving_metrics(pool: asyncpg.Pool, client: Client, settings: Settings) -> AsyncIterator[None]:
    """Serve /metrics on WORKER_METRICS_PORT (nothing when it is 0) until the context exits."""
    if not settings.worker_metrics_port:
        yield
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.metrics_host, settings.worker_metrics_port))
    except OSError as err:
        sock.close()
        log.warning(
            "worker metrics off: %s:%d: %s (WORKER_METRICS_PORT)",
            settings.metrics_host,
            settings.worker_metrics_port,
            err,
        )
        yield
        return
    async with serving(metrics_app(pool, client, settings), "worker metrics", sock=sock):
        yield
