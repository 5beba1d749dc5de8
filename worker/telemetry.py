"""Structured JSON logs and OpenTelemetry tracing for the worker and the CLI.

Logs: one JSON object per line with the Temporal context (workflow id, activity) the SDK attaches,
and correlation id / phase / actor when given as ``extra``. Traces: Temporal's tracing interceptor
makes spans for starting and running workflows and activities; they are exported over OTLP/HTTP when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and cost nothing otherwise (the API's no-op tracer).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from opentelemetry import trace

CONTEXT_FIELDS = ("correlation_id", "workflow_id", "phase", "actor")
_configured: list[str] = []  # the global tracer provider can be set once per process


def shutdown_tracing() -> None:
    """Export the spans still queued and stop the exporter's thread (a no-op when tracing is off)."""
    shutdown = getattr(trace.get_tracer_provider(), "shutdown", None)
    if shutdown is not None:
        shutdown()


class JsonFormatter(logging.Formatter):
    """One JSON object per log record, with the remediation context when known."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a single JSON line."""
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        temporal = getattr(record, "temporal_activity", None) or getattr(record, "temporal_workflow", None)
        if isinstance(temporal, dict):
            out["workflow_id"] = temporal.get("workflow_id")
            if "activity_type" in temporal:
                out["activity"] = temporal["activity_type"]
        for field in CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                out[field] = value
        fields = getattr(record, "fields", None)  # structured facts of one event (audit lines)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(out, default=str)


def configure_logging(level: int = logging.INFO) -> None:
    """JSON lines on stderr for every logger (services: their stderr is their log)."""
    _log_to([logging.StreamHandler()], level)


def configure_command_logging(
    log_file: Path, mode: Literal["auto", "stderr", "file"], level: int = logging.INFO
) -> None:
    """A command's JSON lines: always to ``log_file``; also to stderr when it is not a terminal or when asked.

    On a terminal the commander reads only the human lines; scripts and automation reading stderr keep
    the JSON lines. ``mode`` "stderr" forces them onto stderr, "file" keeps them off it.
    """
    handlers: list[logging.Handler] = []
    try:
        log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Private like the stack's other logs (they name runs, actors and paths).
        os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        os.chmod(log_file, 0o600)
        handlers.append(logging.FileHandler(log_file))
    except OSError:
        mode = "stderr"  # nowhere to keep them: better on stderr than lost
    if mode == "stderr" or (mode == "auto" and not sys.stderr.isatty()):
        handlers.append(logging.StreamHandler())
    _log_to(handlers, level)


def _log_to(handlers: list[logging.Handler], level: int) -> None:
    for handler in handlers:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)


def configure_tracing(service: str, endpoint: str | None) -> bool:
    """Export spans over OTLP/HTTP to ``endpoint`` (e.g. http://collector:4318); False when not configured."""
    if not endpoint:
        return False
    if _configured:
        return True
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces"))
    )
    trace.set_tracer_provider(provider)
    _configured.append(service)
    return True
