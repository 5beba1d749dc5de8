"""Structured logs and OpenTelemetry spans carry the remediation's context."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.testing import WorkflowEnvironment

import remediation_client as operations
import remediation_client.runs
from activities.tempo import TempoActivities
from config import Settings
from contracts.models import Phase, RemediationRequest, RemediationResult, Scope
from tests.conftest import client_with, make_world
from tests.helpers import incident_in, start_dispute
from worker.telemetry import JsonFormatter, configure_tracing

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


async def test_remediation_trace_lands_beside_the_incident_trace_in_tempo(
    pg_settings: Settings,
    template_db: str,
    state_root: Path,
    temporal_env: WorkflowEnvironment,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "billing-remediation-worker"}))
    monkeypatch.setattr(remediation_client.runs, "_tracer", provider.get_tracer("billing_remediation.cli"))
    traced = client_with(
        temporal_env.client, interceptors=[TracingInterceptor(provider.get_tracer("worker"))]
    )
    async for world in make_world(pg_settings, template_db, state_root, traced):
        # The stand-in plays the OTLP collector; a batch processor exports from its own thread.
        endpoint = world.settings.resolved_billing_api_url() + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        incident = await incident_in(world, "user-dispute", "tt")
        caplog.set_level(logging.INFO)
        started = await operations.start(
            world.client,
            world.settings,
            RemediationRequest(
                correlation_id=incident.correlation_id,
                trace_id=incident.trace_id,
                scope=Scope(**incident.scope),
                requested_by="ic-dana",
                dry_run=True,
            ),
        )
        assert started.trace_id is not None and started.trace_id != incident.trace_id
        result = await world.client.get_workflow_handle(
            started.workflow_id, result_type=RemediationResult
        ).result()
        assert result.outcome is Phase.DRY_RUN_COMPLETE
        assert await asyncio.to_thread(provider.force_flush)

        # Both traces through the real Tempo adapter: the incident's and the remediation's own.
        async with httpx.AsyncClient(base_url=world.settings.resolved_billing_api_url()) as http:
            tempo = TempoActivities(http, tenant="t1")
            incident_spans = await tempo.fetch_trace(incident.trace_id)
            own = await tempo.fetch_trace(started.trace_id)
        assert incident_spans and own
        services = {
            attr["value"]["stringValue"]
            for batch in own
            for attr in batch["resource"]["attributes"]
            if attr["key"] == "service.name"
        }
        assert services == {"billing-remediation-worker"}
        spans = [span for batch in own for scope in batch["scopeSpans"] for span in scope["spans"]]
        by_name = {span["name"]: span for span in spans}
        assert {
            "remediate start",
            "StartWorkflow:BillingRemediation",
            "RunActivity:billing_db.reconcile",
        } <= set(by_name)
        reconcile_attrs = {
            a["key"]: a["value"]["stringValue"]
            for a in by_name["RunActivity:billing_db.reconcile"]["attributes"]
        }
        assert reconcile_attrs["correlation_id"] == incident.correlation_id

    await asyncio.to_thread(provider.shutdown)
    # The CLI's and the worker's JSON log lines carry the remediation's context.
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    started_line = next(
        line for line in lines if line["msg"].startswith(f"remediation {started.workflow_id}")
    )
    assert started_line["actor"] == "ic-dana" and started_line["correlation_id"] == incident.correlation_id
    phases = [line for line in lines if line.get("phase") and line.get("workflow_id") == started.workflow_id]
    assert {"diagnosing", "reconciling"} <= {line["phase"] for line in phases}
    activity_lines = [line for line in lines if line.get("activity") == "billing_db.reconcile"]
    assert activity_lines and all(
        line["correlation_id"] == incident.correlation_id for line in activity_lines
    )
