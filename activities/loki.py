"""Loki adapter: correlation-first log search over `GET /loki/api/v1/query_range`."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import httpx
from temporalio import activity

from activities.errors import dependency_down
from activities.http_errors import json_object, raise_for, send
from contracts import names
from contracts.models import CheckResult, RunRef

SERVICES = ("gpuaas-billing-worker", "gpuaas-api", "gpuaas-webhook-worker")
PAGE_LIMIT = 1000
MAX_PAGES = 10


def logql_string(value: str) -> str:
    """A LogQL double-quoted string literal with backslashes and quotes escaped."""
    return json.dumps(value)


def correlation_query(correlation_id: str) -> str:
    """LogQL for every line of the three services carrying ``correlation_id`` (label values escaped)."""
    selector = "{service_name=~" + logql_string("|".join(SERVICES)) + "}"
    literal = logql_string(correlation_id)
    return f'{selector} |= {literal} | json | __error__="" | correlation_id={literal}'


def line_field(line: str, name: str) -> str | None:
    """Field ``name`` of a JSON log line, or None (not JSON, not an object, absent or empty)."""
    try:
        parsed = json.loads(line)
    except json.JSONDecodeError:
        return None
    value = parsed.get(name) if isinstance(parsed, dict) else None
    return str(value) if value else None


def trace_id_of(stream: dict[str, Any], line: str) -> str | None:
    """The trace id of an entry, from the JSON line or the stream's labels/structured metadata."""
    if stream.get("trace_id"):
        return str(stream["trace_id"])
    try:
        parsed = json.loads(line)
    except json.JSONDecodeError:
        return None
    value = parsed.get("trace_id") if isinstance(parsed, dict) else None
    return str(value) if value else None


Entry = tuple[dict[str, Any], int, str]  # labels (stream + structured metadata + parsed), ts ns, line


def _labels(stream: dict[str, Any], value: list[Any]) -> dict[str, Any]:
    """Stream labels merged with the entry's categorized labels (categorize-labels encoding), if any."""
    labels = dict(stream)
    if len(value) > 2 and isinstance(value[2], dict):
        for category in ("structuredMetadata", "parsed"):
            labels.update(value[2].get(category) or {})
    return labels


def _key(entry: Entry) -> tuple[int, str, tuple[tuple[str, str], ...]]:
    labels, ts, line = entry
    return ts, line, tuple(sorted((str(k), str(v)) for k, v in labels.items()))


class LokiActivities:
    """Queries Loki (or the stand-in's Loki-compatible endpoint)."""

    def __init__(
        self, client: httpx.AsyncClient, tenant: str | None, lookback_seconds: int = 7 * 86400
    ) -> None:
        self._client = client
        self._tenant = tenant
        self._lookback = lookback_seconds

    @property
    def lookback_ns(self) -> int:
        """How far back searches look, in nanoseconds."""
        return self._lookback * 1_000_000_000

    async def query_range(self, query: str, start_ns: int, end_ns: int) -> tuple[list[Entry], bool]:
        """Entries of ``query`` in [start, end), paging forward past the per-query limit.

        Returns the entries and whether they are complete (False when MAX_PAGES stopped the paging).
        Pages restart *at* the last timestamp seen, not after it, so entries sharing that nanosecond
        are never skipped; the ones already taken are dropped.
        """
        headers = {"X-Loki-Response-Encoding-Flags": "categorize-labels"}
        if self._tenant:
            headers["X-Scope-OrgID"] = self._tenant
        entries: list[Entry] = []
        at_boundary: set[tuple[int, str, tuple[tuple[str, str], ...]]] = set()
        for _ in range(MAX_PAGES):
            page = await self._page(query, start_ns, end_ns, headers)
            fresh = [e for e in page if _key(e) not in at_boundary]
            entries += fresh
            if len(page) < PAGE_LIMIT:
                return entries, True
            if not fresh:
                break  # a whole page within one nanosecond: cannot move on without losing lines
            start_ns = max(ts for _, ts, _ in page)
            at_boundary = {_key(e) for e in page if e[1] == start_ns}
        return entries, False

    async def _page(self, query: str, start_ns: int, end_ns: int, headers: dict[str, str]) -> list[Entry]:
        response = await send(
            self._client,
            "Loki",
            "GET",
            "/loki/api/v1/query_range",
            headers=headers,
            params={
                "query": query,
                "start": str(start_ns),
                "end": str(end_ns),
                "limit": str(PAGE_LIMIT),
                "direction": "forward",
            },
        )
        raise_for("Loki", response)
        body = json_object("Loki", response)
        data = body.get("data")
        if body.get("status") != "success" or not isinstance(data, dict):
            raise dependency_down(f"Loki answered an unexpected body: {response.text[:100]!r}")
        try:
            return [
                (_labels(s.get("stream", {}), v), int(v[0]), str(v[1]))
                for s in data.get("result", [])
                for v in s.get("values", [])
            ]
        except (TypeError, ValueError, IndexError, AttributeError) as exc:
            raise dependency_down(f"Loki returned malformed streams: {exc}") from exc

    @activity.defn(name=names.QUERY_CORRELATION_LOGS)
    async def query_correlation_logs(self, ref: RunRef) -> CheckResult:
        """Log lines for the correlation id across the billing services, the trace ids found, errors."""
        end = time.time_ns()
        entries, complete = await self.query_range(
            correlation_query(ref.correlation_id), end - self._lookback * 10**9, end
        )
        by_service: Counter[str] = Counter()
        errors = 0
        error_times: list[int] = []
        trace_ids: list[str] = []
        for stream, ts, line in entries:
            by_service[str(stream.get("service_name") or stream.get("service") or "unknown")] += 1
            if str(stream.get("level", "")).lower() in ("error", "fatal"):
                errors += 1
                error_times.append(ts)
            trace = trace_id_of(stream, line)
            if trace and trace not in trace_ids:
                trace_ids.append(trace)
        status = "warn" if errors else "ok"
        headline = (
            (
                f"{len(entries)} lines ({', '.join(f'{s}: {n}' for s, n in sorted(by_service.items()))}), "
                f"{errors} errors, {len(trace_ids)} trace ids"
                + ("" if complete else f" (first {len(entries)} lines only; more exist)")
            )
            if entries
            else "no log lines for this correlation id"
        )
        return CheckResult(
            check="loki_logs",
            status=status,
            headline=headline,
            # The first and last failing lines bound the incident's onset in the evidence's timeline.
            counts={"lines": len(entries), "errors": errors, **dict(by_service)}
            | (
                {"first_error_ns": min(error_times), "last_error_ns": max(error_times)} if error_times else {}
            ),
            trace_ids=trace_ids[:20],
        )
