"""The stand-in's structured logs and trace spans, stored so that Loki/Tempo-style APIs can serve them."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

SERVICES = ("gpuaas-api", "gpuaas-billing-worker", "gpuaas-webhook-worker")


def new_trace_id() -> str:
    """A random 128-bit trace id as 32 hex characters."""
    return secrets.token_hex(16)


def new_span_id() -> str:
    """A random 64-bit span id as 16 hex characters."""
    return secrets.token_hex(8)


async def log(
    conn: asyncpg.Connection | asyncpg.Pool,
    service: str,
    level: str,
    msg: str,
    *,
    correlation_id: str | None = None,
    trace_id: str | None = None,
    ts_ns: int | None = None,
    trace_in_line: bool = True,
    **fields: Any,
) -> None:
    """Write one JSON log line for ``service``.

    With ``trace_in_line=False`` the trace id is kept out of the line and served as Loki structured
    metadata instead (as OTel log pipelines attach it).
    """
    ts = ts_ns if ts_ns is not None else time.time_ns()
    line = {"level": level, "msg": msg, "service": service, **fields}
    if correlation_id:
        line["correlation_id"] = correlation_id
    if trace_id and trace_in_line:
        line["trace_id"] = trace_id
    await conn.execute(
        "INSERT INTO platform_obs.logs (ts_ns, service, level, correlation_id, trace_id, line)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        ts,
        service,
        level,
        correlation_id,
        trace_id,
        json.dumps(line, sort_keys=True),
    )


@dataclass
class Span:
    """One span of a stand-in trace."""

    trace_id: str
    service: str
    name: str
    start_ns: int
    end_ns: int
    span_id: str = field(default_factory=new_span_id)
    parent_span_id: str | None = None
    kind: str = "SPAN_KIND_INTERNAL"
    error: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)


async def record_spans(conn: asyncpg.Connection | asyncpg.Pool, spans: list[Span]) -> None:
    """Store spans (idempotent per span id)."""
    await conn.executemany(
        """INSERT INTO platform_obs.spans (trace_id, span_id, parent_span_id, service, name, kind,
               status_code, status_message, start_ns, end_ns, attributes)
           VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11) ON CONFLICT DO NOTHING""",
        [
            (
                s.trace_id,
                s.span_id,
                s.parent_span_id,
                s.service,
                s.name,
                s.kind,
                "STATUS_CODE_ERROR" if s.error else None,
                s.error,
                s.start_ns,
                s.end_ns,
                json.dumps(s.attributes),
            )
            for s in spans
        ],
    )
