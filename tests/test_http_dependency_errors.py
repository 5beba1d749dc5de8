"""Garbage, throttling, 5xx and timeouts from each HTTP dependency become named, retryable errors."""

from __future__ import annotations

import httpx
import pytest
from temporalio.exceptions import ApplicationError

import remediation_client as operations
from activities.billing_api import BillingApiActivities
from activities.loki import LokiActivities
from activities.tempo import TempoActivities
from contracts.models import FreezeRequest, RunRef, Scope
from tests.conftest import World

pytestmark = pytest.mark.asyncio(loop_scope="session")


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
