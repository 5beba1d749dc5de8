"""Structured logs and OpenTelemetry spans carry the remediation's context."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.testing import WorkflowEnvironment

from config import Settings
from tests.conftest import client_with, make_world
from tests.test_remediation_workflow import start_dispute
from worker.telemetry import JsonFormatter, configure_tracing
from workflows.models import Phase

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_json_log_lines_carry_the_remediation_context() -> None:
    record = logging.LogRecord("activities", logging.INFO, __file__, 1, "applied %d actions", (12,), None)
    record.correlation_id = "corr-1"
    record.phase = "remediating"
    record.actor = "alice"
    record.temporal_activity = {"workflow_id": "remediation-org:o1", "activity_type": "billing_db.apply_plan"}
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "applied 12 actions"
    assert line["workflow_id"] == "remediation-org:o1" and line["activity"] == "billing_db.apply_plan"
    assert (line["correlation_id"], line["phase"], line["actor"]) == ("corr-1", "remediating", "alice")
    assert configure_tracing("svc", None) is False  # silent without an endpoint


async def test_spans_for_workflow_and_activities_carry_ids(
    pg_settings: Settings, template_db: str, state_root: Path, temporal_env: WorkflowEnvironment
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    traced = client_with(temporal_env.client, interceptors=[TracingInterceptor(provider.get_tracer("test"))])
    async for world in make_world(pg_settings, template_db, state_root, traced):
        incident, handle = await start_dispute(world, "ot", dry_run=True)
        assert (await handle.result()).outcome is Phase.DRY_RUN_COMPLETE
    spans = exporter.get_finished_spans()
    names = {s.name for s in spans}
    assert "StartWorkflow:BillingRemediation" in names
    assert "RunWorkflow:BillingRemediation" in names
    assert "RunActivity:billing_db.reconcile" in names
    reconcile = next(s for s in spans if s.name == "RunActivity:billing_db.reconcile")
    attrs = dict(reconcile.attributes or {})
    assert attrs["correlation_id"] == incident.correlation_id
    assert attrs["workflow_id"] == handle.id
    assert attrs["scope.user_id"] == incident.scope["user_id"]
    # One trace: the activity spans hang under the start of the workflow.
    start_span = next(s for s in spans if s.name == "StartWorkflow:BillingRemediation")
    assert reconcile.context.trace_id == start_span.context.trace_id
