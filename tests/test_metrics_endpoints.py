"""The metrics Prometheus scrapes (issue 15): the stand-in's, the worker's own and the Temporal SDK's,
read over HTTP from real endpoints while a remediation waits for approval."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from config import Settings
from contracts.models import Phase
from devstack.processes import free_port
from local_platform import telemetry
from local_platform.billing_worker import SERVICE
from tests.conftest import make_world
from tests.helpers import eventually, start_dispute, wait_phase
from worker.connection import connect_temporal
from worker.main import build_worker, resources
from worker.metrics import sdk_runtime, serving_metrics

pytestmark = pytest.mark.asyncio(loop_scope="session")


def value(text: str, series: str) -> float | None:
    """The sample of ``series`` (name and labels exactly as exposed) in an exposition text."""
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(found[1]) if found else None


async def test_platform_worker_and_sdk_metrics_while_a_plan_waits(
    pg_settings: Settings, template_db: str, state_root: Path, temporal_env: WorkflowEnvironment
) -> None:
    async for world in make_world(
        pg_settings,
        template_db,
        state_root,
        temporal_env.client,
        in_process_worker=False,
        PAYLOAD_ENCRYPTION="off",
        TEMPORAL_ADDRESS=temporal_env.client.service_client.config.target_host,
        WORKER_METRICS_PORT=free_port(),
        TEMPORAL_SDK_METRICS_PORT=free_port(),
        APPROVAL_DEADLINE_SECONDS=1800,
    ):
        settings = world.settings
        client = await connect_temporal(settings, sdk_runtime(settings))
        async with (
            resources(settings) as res,
            serving_metrics(res.pool, client, settings),
            build_worker(client, settings, res),
            httpx.AsyncClient(timeout=10) as http,
        ):
            incident, handle = await start_dispute(world, "mx")
            await wait_phase(handle, {Phase.AWAITING_APPROVAL})

            own = (await http.get(f"http://127.0.0.1:{settings.worker_metrics_port}/metrics")).text
            assert value(own, 'remediation_runs{phase="awaiting_approval"}') == 1.0
            assert value(own, 'remediation_runs{phase="remediating"}') == 0.0
            waited = value(
                own,
                f'remediation_awaiting_approval_seconds{{correlation_id="{incident.correlation_id}",'
                f'workflow_id="{handle.id}"}}',
            )
            assert waited is not None and 0 <= waited < 120, own
            assert value(own, "remediation_approval_deadline_seconds") == 1800.0

            # The SDK's own figures, per activity type, from the runtime's Prometheus exporter.
            sdk_url = f"http://127.0.0.1:{settings.temporal_sdk_metrics_port}/metrics"

            async def sdk(url: str = sdk_url, http: httpx.AsyncClient = http) -> str | None:
                text = (await http.get(url)).text
                return text if 'activity_type="billing_db.build_plan"' in text else None

            text = await eventually(sdk, timeout=20, what="the SDK's activity metrics")
            assert "temporal_activity_execution_latency" in text

            platform = (await http.get(f"http://127.0.0.1:{settings.platform_port}/metrics")).text
            assert value(platform, "billing_worker_up") == 1.0
            assert (
                value(
                    platform,
                    'billing_worker_consumer_pending_messages{consumer="' + settings.billing_consumer + '"}',
                )
                is not None
            )
            failures = value(platform, "billing_worker_failures_total")
            assert failures is not None
            # A crash report is BillingWorkerDown's business; only events the worker failed count.
            await telemetry.log(world.db, SERVICE, "error", "billing worker crashed: panic (test)")
            await telemetry.log(world.db, SERVICE, "error", "failed provisioning.active: boom (test)")
            await world.db.execute("UPDATE billing.worker_control SET mode = 'crashed'")
            platform = (await http.get(f"http://127.0.0.1:{settings.platform_port}/metrics")).text
            assert value(platform, "billing_worker_up") == 0.0
            assert value(platform, "billing_worker_failures_total") == failures + 1
            await handle.terminate("test done")
