"""Alert intake: real HTTP posts to the receiver and real NATS events start (or attach to) remediations."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from pydantic import SecretStr
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError

import remediation_client as operations
from alert_intake.mapping import MappingError, load_mapping
from alert_intake.serve import running_intake
from contracts.models import Phase, RemediationRequest, Scope, StatusView
from devstack.processes import free_port
from tests.helpers import approve_quorum, eventually, incident_in, listed_runs, wait_phase
from workflows.search_attributes import SA_ORG, SA_TRIGGER

from .conftest import World

TOKEN = "test-alerts-token"


@dataclass
class Receiver:
    world: World
    http: httpx.AsyncClient


@pytest_asyncio.fixture(loop_scope="session")
async def receiver(world: World) -> AsyncIterator[Receiver]:
    port = free_port()
    settings = world.settings.model_copy(
        update={"alerts_token": SecretStr(TOKEN), "alerts_host": "127.0.0.1"}
    )
    async with (
        running_intake(settings, client=world.client, port=port),
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
        ) as http,
    ):
        yield Receiver(world, http)


def alert(
    name: str, labels: dict[str, str], *, status: str = "firing", fingerprint: str = "f1"
) -> dict[str, Any]:
    return {
        "status": status,
        "labels": {"alertname": name, **labels},
        "annotations": {"summary": f"{name} is {status}"},
        "startsAt": "2026-11-26T01:00:00Z",
        "endsAt": "2026-11-26T02:00:00Z" if status == "resolved" else "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus/graph",
        "fingerprint": fingerprint,
    }


def notification(*alerts: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": "4",
        "groupKey": '{}:{alertname="BillingWorkerDown"}',
        "truncatedAlerts": 0,
        "status": alerts[0]["status"],
        "receiver": "billing-remediation",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager",
        "alerts": list(alerts),
    }


async def runs_of(world: World, workflow_id: str) -> list[Any]:
    return [wf async for wf in world.client.list_workflows(f'WorkflowId = "{workflow_id}"')]


async def status_of(world: World, workflow_id: str) -> StatusView:
    return await operations.status(world.client, workflow_id)


def test_default_mapping_loads_and_bad_files_name_the_problem(tmp_path: Path) -> None:
    mapping = load_mapping()
    assert mapping.trigger_for("BillingQueueLag") is not None
    assert mapping.trigger_for("SomethingElse") is None
    bad = tmp_path / "bad.toml"
    bad.write_text('[[routes]]\nalertname = "X"\ntrigger = "panic"\n')
    with pytest.raises(MappingError, match=r"routes\.0\.trigger"):
        load_mapping(bad)
    bad.write_text("routes = [")
    with pytest.raises(MappingError, match="not valid TOML"):
        load_mapping(bad)
    with pytest.raises(MappingError, match="cannot read"):
        load_mapping(tmp_path / "missing.toml")


@pytest.mark.asyncio(loop_scope="session")
async def test_malformed_and_unauthorized_posts_get_4xx_with_the_reason(receiver: Receiver) -> None:
    http = receiver.http
    body = notification(alert("BillingWorkerDown", {}))
    assert (
        await http.post("/alertmanager", json=body, headers={"Authorization": "Bearer nope"})
    ).status_code == 401
    assert (await http.post("/alertmanager", json=body, headers={"Authorization": ""})).status_code == 401
    answer = await http.post(
        "/alertmanager", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 400 and "not JSON" in answer.json()["error"]
    answer = await http.post("/alertmanager", json={**body, "version": "3"})
    assert answer.status_code == 422 and "version" in answer.json()["error"]
    huge = await http.post(
        "/alertmanager", content=b"x" * 5_000_001, headers={"Content-Type": "application/json"}
    )
    assert huge.status_code == 413 and "limit" in huge.json()["error"]
    answer = await http.post("/alertmanager", json={**body, "alerts": []})
    assert answer.status_code == 422 and "alerts" in answer.json()["error"]
    no_fingerprint = {k: v for k, v in alert("BillingWorkerDown", {}).items() if k != "fingerprint"}
    answer = await http.post("/alertmanager", json=notification(no_fingerprint))
    assert answer.status_code == 422 and "fingerprint" in answer.json()["error"]
    # One bad alert refuses the whole notification: nothing half-started.
    good = alert("BillingWorkerDown", {"org_id": "nosuch-good"}, fingerprint="g")
    incident = await incident_in(receiver.world, "user-dispute", "am")
    good["labels"]["org_id"] = incident.scope["org_id"]
    bad = alert("BillingQueueLag", {"org_id": "org-that-does-not-exist"}, fingerprint="b")
    answer = await http.post("/alertmanager", json=notification(good, bad))
    assert answer.status_code == 422, answer.text
    assert answer.json()["refused"][0]["fingerprint"] == "b"
    assert "org-that-does-not-exist" in answer.json()["refused"][0]["reason"]
    started = RemediationRequest(
        correlation_id="x", scope=Scope(org_id=incident.scope["org_id"]), requested_by="x"
    ).workflow_id()
    assert await runs_of(receiver.world, started) == []
    # Alerts with no route are acknowledged as ignored, not errors (Alertmanager must not retry them).
    answer = await http.post("/alertmanager", json=notification(alert("DiskFull", {}, fingerprint="d")))
    assert answer.status_code == 200
    assert answer.json()["results"][0]["action"] == "ignored"


@pytest.mark.asyncio(loop_scope="session")
async def test_a_burst_of_duplicates_makes_one_workflow_and_resolution_is_recorded(
    receiver: Receiver,
) -> None:
    world = receiver.world
    incident = await incident_in(world, "user-dispute", "ab")
    org = incident.scope["org_id"]
    labels = {"org_id": org, "correlation_id": incident.correlation_id}
    body = notification(alert("BillingWorkerDown", labels, fingerprint="burst-1"))
    gate = asyncio.Semaphore(64)

    async def post() -> dict[str, Any]:
        async with gate:
            answer = await receiver.http.post("/alertmanager", json=body)
            assert answer.status_code == 200, answer.text
            result: dict[str, Any] = answer.json()["results"][0]
            return result

    results = await asyncio.gather(*(post() for _ in range(1000)))
    actions = Counter(r["action"] for r in results)
    assert actions == {"started": 1, "attached": 999}
    workflow_ids = {r["workflow_id"] for r in results}
    assert len(workflow_ids) == 1
    workflow_id = workflow_ids.pop()
    # Independently of what the intake reported: the server holds exactly one run for the scope.
    runs = await listed_runs(world.client, workflow_id)
    assert len(runs) == 1 and runs[0].status == WorkflowExecutionStatus.RUNNING
    view = await status_of(world, workflow_id)
    assert [(a.name, a.status) for a in view.alerts] == [("BillingWorkerDown", "firing")]
    history = await world.client.get_workflow_handle(workflow_id).fetch_history()
    signals = [e for e in history.events if e.HasField("workflow_execution_signaled_event_attributes")]
    assert len(signals) == 1, "a storm of duplicates must not flood the run's history"

    # A second alert name for the same scope attaches too; the resolved alert is recorded, not obeyed.
    lag = notification(alert("BillingQueueLag", labels, fingerprint="lag-1"))
    assert (await receiver.http.post("/alertmanager", json=lag)).json()["results"][0]["action"] == "attached"
    resolved = notification(alert("BillingWorkerDown", labels, status="resolved", fingerprint="burst-1"))
    answer = await receiver.http.post("/alertmanager", json=resolved)
    assert answer.json()["results"][0]["action"] == "resolved_recorded"
    view = await status_of(world, workflow_id)
    assert {(a.name, a.status) for a in view.alerts} == {
        ("BillingWorkerDown", "firing"),
        ("BillingQueueLag", "firing"),
        ("BillingWorkerDown", "resolved"),
    }
    resolved_at = next(a for a in view.alerts if a.status == "resolved").ends_at
    assert resolved_at is not None and resolved_at.hour == 2
    assert (
        await world.client.get_workflow_handle(workflow_id).describe()
    ).status == WorkflowExecutionStatus.RUNNING
    await operations.abort(world.client, workflow_id)
    with pytest.raises(WorkflowFailureError):
        await world.client.get_workflow_handle(workflow_id).result()
    # With nothing running, a late resolution is acknowledged and changes nothing.
    answer = await receiver.http.post("/alertmanager", json=resolved)
    assert answer.json()["results"][0]["action"] == "no_running_remediation"
    assert len(await listed_runs(world.client, workflow_id)) == 1


@pytest.mark.asyncio(loop_scope="session")
async def test_reconcile_failed_events_on_nats_start_one_remediation_per_org(receiver: Receiver) -> None:
    world = receiver.world

    # The subscriber's durable consumer vanishes under it (an operator, a stream restore): the loop
    # fails, says why on /healthz, binds again, and the events below are still handled.
    async def subscriber_when(ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            health: dict[str, Any] = (await receiver.http.get("/healthz")).json()["loops"]["nats_subscriber"]
            return health if ready(health) else None

        return await eventually(probe, interval=0.1, what="the subscriber's health")

    await subscriber_when(lambda h: h["last_progress_at"] is not None)  # bound: its consumer exists
    await world.nc.jetstream().delete_consumer(
        world.settings.billing_stream, world.settings.alerts_nats_durable
    )
    health = await subscriber_when(lambda h: h["restarts"] >= 1 and h["state"] == "running")
    assert health["last_error"]
    # A malformed event is dropped (terminated), and the subscriber keeps going.
    await world.nc.publish("payments.reconcile_failed", b"\xff not json")
    await world.nc.publish("payments.reconcile_failed", json.dumps({"trace_id": "ab"}).encode())
    incident = await incident_in(world, "payments-reconcile", "pn")
    orgs = set(
        await world.db.fetch(
            "SELECT DISTINCT org_id FROM billing.payment_sessions WHERE id = ANY($1::text[])",
            [pay for kind, ids in incident.injected.items() if kind.startswith("payment_") for pay in ids],
        )
    )
    expected = {
        RemediationRequest(
            correlation_id="x", scope=Scope(org_id=row["org_id"]), requested_by="x"
        ).workflow_id()
        for row in orgs
    }

    async def all_started() -> bool:
        return {wid for wid in expected if await runs_of(world, wid)} == expected

    await eventually(
        all_started, timeout=60, interval=0.5, what=f"one remediation per org: {sorted(expected)}"
    )
    for workflow_id in expected:
        runs = await listed_runs(world.client, workflow_id)
        assert len(runs) == 1
        view = await status_of(world, workflow_id)
        assert view.alerts and all(
            a.source == "nats" and a.name == "payments.reconcile_failed" for a in view.alerts
        )
        description = await world.client.get_workflow_handle(workflow_id).describe()
        # Findable in the UI as what it is: started by a reconcile failure, for that org.
        attributes = description.typed_search_attributes
        assert attributes.get(SA_TRIGGER) == "reconcile_failed"
        assert attributes.get(SA_ORG) == workflow_id.removeprefix("remediation-org:")
        await operations.abort(world.client, workflow_id)
    # Every payment session's event is recorded once on its org's run.
    total = 0
    for workflow_id in expected:
        total += len((await status_of(world, workflow_id)).alerts)
    assert total == sum(len(ids) for kind, ids in incident.injected.items() if kind.startswith("payment_"))


@pytest.mark.asyncio(loop_scope="session")
async def test_a_handed_over_payment_alert_does_not_restart_a_remediation(receiver: Receiver) -> None:
    """After a run hands a refunded payment to the payments team, repeats of the alert that keeps firing
    (correctly) answer with that run instead of starting another; a newly failed session starts one."""
    world = receiver.world
    incident = await incident_in(world, "payments-reconcile", "ho")
    refunded = incident.injected["payment_refunded"][0]
    org = await world.db.fetchval("SELECT org_id FROM billing.payment_sessions WHERE id = $1", refunded)
    labels = {"org_id": org, "correlation_id": incident.correlation_id}
    body = notification(alert("PaymentsReconcileFailed", labels, fingerprint="prf-1"))
    first = (await receiver.http.post("/alertmanager", json=body)).json()["results"][0]
    assert first["action"] == "started", first
    handle = world.client.get_workflow_handle(first["workflow_id"])
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    await approve_quorum(handle, view)
    # Recorded on the run so verification does not wait ALERT_RESOLVED_WAIT_SECONDS for it (this test's
    # Alertmanager is the receiver's caller only; the repeats below are what a firing alert sends).
    resolved = notification(alert("PaymentsReconcileFailed", labels, status="resolved", fingerprint="prf-1"))
    assert (await receiver.http.post("/alertmanager", json=resolved)).status_code == 200
    await handle.result()
    followed = await world.db.fetchval(
        """SELECT count(*) FROM remediation.applied_actions
           WHERE idempotency_key = $1 AND outcome = 'follow_up'""",
        f"payment-investigate:{refunded}",
    )
    assert followed == 1
    still_failed = await world.db.fetch(
        "SELECT id FROM billing.payment_sessions WHERE org_id = $1 AND status = 'failed_reconcile'", org
    )
    assert refunded in {r["id"] for r in still_failed}  # the alert keeps firing, correctly

    # Alertmanager's repeats: answered with the run that handed it over, no new run, no new pack.
    for _ in range(3):
        repeat = (await receiver.http.post("/alertmanager", json=body)).json()["results"][0]
        assert repeat["action"] == "handed_over", repeat
        assert refunded in repeat["detail"] and first["workflow_id"] in repeat["detail"]
    assert len(await listed_runs(world.client, first["workflow_id"])) == 1
    packs = await world.db.fetchval(
        "SELECT count(*) FROM remediation.evidence e JOIN remediation.runs r USING (run_id) WHERE r.workflow_id = $1",
        first["workflow_id"],
    )
    assert packs == 1

    # Another session of the org fails: the alert means something new, and a remediation starts.
    await world.db.execute(
        """INSERT INTO billing.payment_sessions (id, org_id, user_id, amount_minor, status, provider_ref)
           SELECT 'ho-new-failed', org_id, user_id, 500, 'failed_reconcile', provider_ref
           FROM billing.payment_sessions WHERE id = $1""",
        refunded,
    )
    again = (await receiver.http.post("/alertmanager", json=body)).json()["results"][0]
    assert again["action"] == "started", again
    assert len(await listed_runs(world.client, first["workflow_id"], at_least=2)) == 2
    await operations.abort(world.client, first["workflow_id"])
