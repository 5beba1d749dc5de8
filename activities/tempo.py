"""Tempo adapter: trace by id (v2, falling back to v1), summarized as services, error spans and duration."""

from __future__ import annotations

import base64
import re
from typing import Any

import httpx
from temporalio import activity

from activities.errors import bad_input, dependency_down
from activities.http_errors import json_object, raise_for, send
from contracts import names
from contracts.models import CheckResult, RunRef


def normalize_trace_id(raw: str) -> str:
    """Lower-case hex, left-padded to 32 characters (Tempo drops leading zeros)."""
    if not re.fullmatch(r"[0-9a-fA-F]{1,32}", raw):
        raise bad_input(f"trace id {raw!r} is not 1-32 hex characters")
    return raw.lower().rjust(32, "0")


def span_id_hex(value: str) -> str:
    """Tempo's JSON carries ids as standard base64: decode to hex."""
    return base64.b64decode(value).hex()


def summarize(resource_spans: list[dict[str, Any]]) -> dict[str, Any]:
    """Services, error spans and duration of a trace in OTLP JSON form."""
    services: set[str] = set()
    errors: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    spans = 0
    for rs in resource_spans:
        service = next(
            (
                a["value"].get("stringValue", "")
                for a in rs.get("resource", {}).get("attributes", [])
                if a.get("key") == "service.name"
            ),
            "unknown",
        )
        services.add(service)
        for scope_spans in rs.get("scopeSpans", []) or rs.get("instrumentationLibrarySpans", []):
            for span in scope_spans.get("spans", []):
                spans += 1
                starts.append(int(span.get("startTimeUnixNano", "0")))
                ends.append(int(span.get("endTimeUnixNano", "0")))
                if span.get("status", {}).get("code") == "STATUS_CODE_ERROR":
                    message = span["status"].get("message", "")
                    errors.append(
                        f"{service}: {span.get('name', '?')}" + (f" ({message})" if message else "")
                    )
    duration_ms = (max(ends) - min(starts)) // 1_000_000 if spans else 0
    return {"services": sorted(services), "spans": spans, "error_spans": errors, "duration_ms": duration_ms}


class TempoActivities:
    """Reads traces from Tempo (or the stand-in's Tempo-compatible endpoint)."""

    def __init__(self, client: httpx.AsyncClient, tenant: str | None) -> None:
        self._client = client
        self._tenant = tenant

    async def fetch_trace(self, trace_id: str) -> list[dict[str, Any]] | None:
        """The trace's resource spans, or None when Tempo does not have it."""
        headers = {"X-Scope-OrgID": self._tenant} if self._tenant else {}
        trace_hex = normalize_trace_id(trace_id)
        response = await send(self._client, "Tempo", "GET", f"/api/v2/traces/{trace_hex}", headers=headers)
        if response.status_code == 404:
            # Older Tempo versions have no v2 endpoint: fall back to v1 (404 with empty body = missing).
            response = await send(self._client, "Tempo", "GET", f"/api/traces/{trace_hex}", headers=headers)
            if response.status_code == 404:
                return None
            raise_for("Tempo", response)
            return _span_list(json_object("Tempo", response).get("batches"))
        raise_for("Tempo", response)
        trace = json_object("Tempo", response).get("trace") or {}
        if not isinstance(trace, dict):
            raise dependency_down("Tempo returned a trace that is not an object")
        return _span_list(trace.get("resourceSpans"))

    @activity.defn(name=names.SUMMARIZE_TRACE)
    async def summarize_trace(self, ref: RunRef) -> CheckResult:
        """Services, error spans and duration of the incident's trace."""
        if not ref.trace_id:
            return CheckResult(check="tempo_trace", status="skipped", headline="no trace id")
        spans = await self.fetch_trace(ref.trace_id)
        if spans is None:
            return CheckResult(
                check="tempo_trace",
                status="warn",
                headline=f"trace {ref.trace_id} not found in Tempo",
                trace_ids=[ref.trace_id],
            )
        summary = summarize(spans)
        errors = summary["error_spans"]
        headline = (
            f"{summary['spans']} spans over {', '.join(summary['services'])}, {summary['duration_ms']} ms"
            + (f"; errors: {'; '.join(errors[:3])}" if errors else "")
        )
        return CheckResult(
            check="tempo_trace",
            status="warn" if errors else "ok",
            headline=headline[:500],
            counts={
                "spans": summary["spans"],
                "error_spans": len(errors),
                "duration_ms": summary["duration_ms"],
            },
            trace_ids=[ref.trace_id],
        )


def _span_list(value: Any) -> list[dict[str, Any]] | None:
    """Resource spans as a list of objects, or a retryable error naming the malformed answer."""
    if not value:
        return None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise dependency_down("Tempo returned malformed resource spans")
    return value
