"""The platform stand-in against real Postgres and NATS: seeder exactness, admin API, Loki/Tempo formats."""

from __future__ import annotations

import json
from unittest.mock import patch

import httpx
import pytest
from temporalio.exceptions import ApplicationError

import remediation_client as operations
from activities.billing_api import BillingApiActivities
from activities.errors import dependency_down
from activities.loki import PAGE_LIMIT, LokiActivities, correlation_query, trace_id_of
from activities.tempo import TempoActivities, normalize_trace_id
from local_platform.seeder import SeedSpec, parse_inject, seed
from local_platform.telemetry import log
from tests.conftest import World
from tests.test_remediation_workflow import DRIFT_SQL, drift, incident_in
from workflows.models import FreezeRequest, RunRef, Scope

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_seed_injects_exactly_what_it_reports(world: World) -> None:
    async with world.db.acquire() as conn:
        clean = await seed(conn, SeedSpec(orgs=4, allocations=200, prefix="c", seed=3), world.nc)
    assert clean.injected == {
        k: [] for k in ("missing_open", "orphan_open", "unbilled_closed", "payment_drift")
    }
    assert await drift(world) == {k: set() for k in DRIFT_SQL}
    # Ledger agrees with usage: every closed usage record with cost has exactly its debit.
    assert (
        await world.db.fetchval(
            """SELECT count(*) FROM billing.usage_records u LEFT JOIN billing.ledger_entries l ON l.usage_record_id = u.id
           WHERE u.end_time IS NOT NULL AND -coalesce(l.amount_minor, 0) <> u.accrued_cost_minor"""
        )
        == 0
    )
    async with world.db.acquire() as conn:
        dirty = await seed(
            conn,
            SeedSpec(
                orgs=3,
                allocations=150,
                prefix="d",
                seed=5,
                inject=parse_inject("missing_open=3,orphan_open=2,unbilled_closed=4,payment_drift=5"),
            ),
            world.nc,
        )
    found = await drift(world)
    assert found["missing_open"] == set(dirty.injected["missing_open"])
    assert found["orphan_open"] == set(dirty.injected["orphan_open"])
    assert found["unbilled_closed"] == set(dirty.injected["unbilled_closed"])
    assert found["payment_drift"] == set(dirty.injected["payment_drift"])
    with pytest.raises(ValueError, match="unknown drift kind"):
        parse_inject("bogus=1")


async def test_admin_api_restricted_state_matches_runbook(world: World) -> None:
    incident = await incident_in(world, "prepaid-depleted", "ap")
    org = incident.scope["org_id"]
    url = world.settings.resolved_billing_api_url()
    auth = {"Authorization": f"Bearer {world.settings.billing_api_token.get_secret_value()}"}
    async with httpx.AsyncClient(base_url=url) as http:
        assert (
            await http.get(
                "/api/v1/billing/financial-posture", headers={"Authorization": "Bearer nope", "X-Org-ID": org}
            )
        ).status_code == 401
        posture = (
            await http.get("/api/v1/billing/financial-posture", headers={**auth, "X-Org-ID": org})
        ).json()
        assert posture["state"] == "restricted" and posture["reason"] == "prepaid_balance_depleted"
        assert posture["effects"]["block_new_launches"] is True
        pre = (
            await http.post(
                "/api/v1/v3/launch/compute/precheck",
                json={"sku": "compute-vm-small"},
                headers={**auth, "X-Project-ID": "ap-prj-0000-0"},
            )
        ).json()
        assert next(c for c in pre["checks"] if c["id"] == "billing")["severity"] == "blocker"
        submit = await http.post(
            "/api/v1/v3/launch/compute",
            json={"sku": "compute-vm-small"},
            headers={**auth, "X-Project-ID": "ap-prj-0000-0"},
        )
        assert submit.status_code == 402 and submit.json()["error"]["code"] == "insufficient_balance"
        # Freeze refuses manual adjustments for the org until lifted.
        await http.post(
            "/api/v1/admin/billing/adjustments/freeze",
            headers=auth,
            json={"freeze_id": "f1", "scope_key": f"org:{org}", "reason": "test", "actor": "t"},
        )
        adj = {
            "org_id": org,
            "user_id": "ap-usr-0000-0",
            "amount_minor": 100,
            "reason": "goodwill",
            "actor": "t",
            "idempotency_key": "adj-1",
        }
        assert (
            await http.post("/api/v1/admin/billing/adjustments", headers=auth, json=adj)
        ).status_code == 423
        await http.post(
            "/api/v1/admin/billing/adjustments/unfreeze", headers=auth, json={"freeze_id": "f1", "actor": "t"}
        )
        assert (
            await http.post("/api/v1/admin/billing/adjustments", headers=auth, json=adj)
        ).status_code == 200
        again = (await http.post("/api/v1/admin/billing/adjustments", headers=auth, json=adj)).json()
        assert again["duplicate"] is True


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


async def test_seed_refuses_bad_input_before_writing(world: World) -> None:
    with pytest.raises(ValueError, match="--orgs"):
        SeedSpec(orgs=0)
    with pytest.raises(ValueError, match="--prefix"):
        SeedSpec(prefix="Bad Prefix!")
    async with world.db.acquire() as conn:
        await seed(conn, SeedSpec(orgs=1, allocations=5, prefix="dup"))
        before = await conn.fetchval("SELECT count(*) FROM billing.allocations")
        with pytest.raises(ValueError, match="already seeded"):
            await seed(conn, SeedSpec(orgs=2, allocations=5, prefix="dup"))
        assert await conn.fetchval("SELECT count(*) FROM billing.allocations") == before


async def test_loki_garbage_is_a_retryable_dependency_error() -> None:
    # Loki itself cannot run here; a transport answering garbage stands in for a broken proxy.
    answers = [
        httpx.Response(200, text="<html>gateway</html>"),
        httpx.Response(200, json={"status": "success", "data": {"result": [{"values": [["x"]]}]}}),
        httpx.Response(200, json={"status": "error"}),
    ]
    for answer in answers:
        transport = httpx.MockTransport(lambda request, a=answer: a)
        async with httpx.AsyncClient(base_url="http://loki", transport=transport) as http:
            with pytest.raises(ApplicationError) as err:
                await LokiActivities(http, None).query_range('{a="b"}', 0, 1)
        assert err.value.type == "DependencyDown" and not err.value.non_retryable


def _transport(*answers: httpx.Response | Exception) -> tuple[httpx.MockTransport, list[int]]:
    """A transport answering ``answers`` in turn (the last one repeats), counting calls."""
    calls = [0]

    def handler(request: httpx.Request) -> httpx.Response:
        answer = answers[min(calls[0], len(answers) - 1)]
        calls[0] += 1
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handler), calls


async def test_429_and_5xx_are_retried_with_backoff_then_reported() -> None:
    transport, calls = _transport(
        httpx.Response(429, headers={"Retry-After": "0"}),
        httpx.Response(503, text="busy"),
        httpx.Response(200, json={"status": "success", "data": {"resultType": "streams", "result": []}}),
    )
    async with httpx.AsyncClient(base_url="http://loki", transport=transport) as http:
        assert await LokiActivities(http, None).query_range('{a="b"}', 0, 1) == ([], True)
    assert calls[0] == 3
    transport, calls = _transport(httpx.Response(503, text="still busy"))
    async with httpx.AsyncClient(base_url="http://tempo", transport=transport) as http:
        with pytest.raises(ApplicationError, match="HTTP 503: still busy") as err:
            await TempoActivities(http, None).fetch_trace("ab" * 16)
    assert calls[0] == 3 and err.value.type == "DependencyDown"


@pytest.mark.parametrize("system", ["loki", "tempo", "admin"])
async def test_timeouts_and_garbage_from_each_dependency_are_named_retryable_errors(system: str) -> None:
    ref = RunRef(run_id="r", workflow_id="w", correlation_id="c", trace_id="ab" * 16, scope=Scope())

    async def call(http: httpx.AsyncClient) -> object:
        if system == "loki":
            return await LokiActivities(http, None).query_range('{a="b"}', 0, 1)
        if system == "tempo":
            return await TempoActivities(http, None).fetch_trace("ab" * 16)
        await BillingApiActivities(http).freeze_adjustments(
            FreezeRequest(ref=ref, freeze_id="f", actor="ic", reason="test")
        )
        return None

    name = {"loki": "Loki", "tempo": "Tempo", "admin": "billing"}[system]
    garbage: list[httpx.Response | Exception] = [
        httpx.ReadTimeout("slow"),
        httpx.Response(200, text="<html>proxy error</html>"),
        httpx.Response(200, json=["not", "an", "object"]),
    ]
    if system == "tempo":
        garbage.append(httpx.Response(200, json={"trace": {"resourceSpans": "nonsense"}}))
    for answer in garbage:
        transport, _ = _transport(answer)
        async with httpx.AsyncClient(base_url="http://dep", transport=transport) as http:
            with pytest.raises(ApplicationError) as err:
                await call(http)
        assert err.value.type == "DependencyDown" and not err.value.non_retryable, err.value
        assert name.lower() in str(err.value).lower(), err.value


async def test_a_plan_id_that_does_not_exist_is_named(world: World) -> None:
    with pytest.raises(operations.OperationError, match="plan 'no-such-plan' does not exist"):
        await operations.plan_actions(world.settings, "no-such-plan")
