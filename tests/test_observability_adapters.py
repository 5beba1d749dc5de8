"""The Loki and Tempo adapters against the stand-in, which answers in their documented formats."""

from __future__ import annotations

import json
from unittest.mock import patch

import httpx
import pytest
from temporalio.exceptions import ApplicationError

from activities.errors import dependency_down
from activities.loki import PAGE_LIMIT, LokiActivities, correlation_query, trace_id_of
from activities.tempo import TempoActivities, normalize_trace_id
from contracts.models import RunRef
from local_platform.telemetry import log
from tests.conftest import World
from tests.helpers import incident_in

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_loki_and_tempo_adapters_against_stand_in(world: World) -> None:
    incident = await incident_in(world, "payments-reconcile", "lk")
    async with httpx.AsyncClient(base_url=world.settings.resolved_billing_api_url()) as http:
        loki = LokiActivities(http, None)
        entries, complete = await loki.query_range(correlation_query(incident.correlation_id), 0, 2**62)
        assert complete
        assert {s["service_name"] for s, _, _ in entries} == {"gpuaas-api", "gpuaas-webhook-worker"}
        assert all(isinstance(ts, int) for _, ts, _ in entries)
        # The webhook worker ships its trace id as structured metadata only; the adapter finds it there.
        webhook = next((s, line) for s, _, line in entries if s["service_name"] == "gpuaas-webhook-worker")
        assert "trace_id" not in json.loads(webhook[1])
        assert trace_id_of(*webhook) == incident.trace_id
        # Label values are escaped: a quote in the correlation id cannot break out of the query.
        assert await loki.query_range(correlation_query('x" } |= "'), 0, 2**62) == ([], True)
        bad = await http.get("/loki/api/v1/query_range", params={"query": "{"})
        assert bad.status_code == 400 and bad.headers["content-type"].startswith("text/plain")
        tempo = TempoActivities(http, None)
        spans = await tempo.fetch_trace(incident.trace_id)
        assert spans is not None and len(spans) == 3  # api, billing worker, webhook worker
        assert await tempo.fetch_trace("1" * 32) is None
        v1 = await http.get(f"/api/traces/{'1' * 32}")
        assert v1.status_code == 404 and v1.content == b""
        with pytest.raises(ApplicationError, match="hex"):
            normalize_trace_id("not-hex")
        summary = await tempo.summarize_trace(
            RunRef(run_id="r", workflow_id="w", correlation_id="c", trace_id=incident.trace_id)
        )
        assert summary.counts["error_spans"] == 1
    # An unreachable Loki is a retryable DependencyDown, not a crash.
    async with httpx.AsyncClient(base_url="http://127.0.0.1:9") as dead:
        with pytest.raises(ApplicationError) as err:
            await LokiActivities(dead, None).query_range('{a="b"}', 0, 1)
        assert err.value.type == dependency_down("x").type


async def test_loki_pages_past_the_entries_limit_without_losing_lines_at_a_page_boundary(
    world: World,
) -> None:
    # 2,500 lines for one correlation id; 30 of them share the nanosecond where page 1 ends.
    base = 1_700_000_000_000_000_000
    stamps = [base + i for i in range(990)] + [base + 990] * 30 + [base + 1000 + i for i in range(1480)]
    async with world.db.acquire() as conn:
        for n, ts in enumerate(stamps):
            await log(
                conn, "gpuaas-billing-worker", "info", f"line {n}", correlation_id="page-corr", ts_ns=ts
            )
    async with httpx.AsyncClient(base_url=world.settings.resolved_billing_api_url()) as http:
        loki = LokiActivities(http, None)
        entries, complete = await loki.query_range(correlation_query("page-corr"), 0, 2**62)
        assert complete
        assert sorted(json.loads(line)["msg"] for _, _, line in entries) == sorted(
            f"line {n}" for n in range(len(stamps))
        )
        # Without the categorize flag the stand-in merges metadata into stream labels, like Loki.
        plain = await http.get(
            "/loki/api/v1/query_range",
            params={
                "query": correlation_query("page-corr"),
                "start": "0",
                "limit": "5",
                "direction": "forward",
            },
        )
        assert "encodingFlags" not in plain.json()["data"]
        assert all(len(v) == 2 for s in plain.json()["data"]["result"] for v in s["values"])
    # Paging stops at MAX_PAGES and says the result is incomplete rather than pretending.
    async with httpx.AsyncClient(base_url=world.settings.resolved_billing_api_url()) as http:
        with patch("activities.loki.MAX_PAGES", 2):
            entries, complete = await LokiActivities(http, None).query_range(
                correlation_query("page-corr"), 0, 2**62
            )
        # Page 1 ends inside the shared nanosecond (10 of 30 taken); page 2 restarts there and drops those 10.
        assert not complete and len(entries) == 2 * PAGE_LIMIT - 10
