"""OTLP/HTTP trace receiver: the remediation's own spans land beside the platform's, served by the Tempo API.

The stand-in plays the collector for the demo and tests (`OTEL_EXPORTER_OTLP_ENDPOINT` = the stand-in's
URL); in production the worker exports to a real collector instead.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from local_platform.telemetry import Span, record_spans

PROTOBUF = "application/x-protobuf"
MAX_BODY_BYTES = 10_000_000


def _value(value: AnyValue) -> str:
    kind = value.WhichOneof("value")
    return "" if kind is None else str(getattr(value, kind))


def _attributes(items: Any) -> dict[str, str]:
    return {kv.key: _value(kv.value) for kv in items if isinstance(kv, KeyValue)}


def spans_of(request: ExportTraceServiceRequest) -> list[Span]:
    """Every span in an export request, in the stand-in's storage shape."""
    out: list[Span] = []
    for resource_spans in request.resource_spans:
        service = _attributes(resource_spans.resource.attributes).get("service.name", "unknown_service")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                error = (
                    (span.status.message or "error") if span.status.code == Status.STATUS_CODE_ERROR else None
                )
                out.append(
                    Span(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        service=service,
                        name=span.name,
                        kind=OtlpSpan.SpanKind.Name(span.kind),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        error=error,
                        attributes=_attributes(span.attributes),
                    )
                )
    return out


async def receive_traces(request: Request) -> Response:
    """POST /v1/traces (OTLP/HTTP, protobuf): store the spans; answer an empty ExportTraceServiceResponse."""
    if request.headers.get("content-type", "").split(";")[0].strip() != PROTOBUF:
        return PlainTextResponse(f"unsupported content type; send {PROTOBUF}", status_code=415)
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        return PlainTextResponse("export request too large", status_code=413)
    export = ExportTraceServiceRequest()
    try:
        export.ParseFromString(body)
    except DecodeError as err:
        return PlainTextResponse(f"not an ExportTraceServiceRequest: {err}", status_code=400)
    spans = spans_of(export)
    if spans:
        await record_spans(request.app.state.pool, spans)
    return Response(ExportTraceServiceResponse().SerializeToString(), media_type=PROTOBUF)


ROUTES = [Route("/v1/traces", receive_traces, methods=["POST"])]
