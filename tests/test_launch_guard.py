"""Launch restriction verification: posture, precheck and submit against the runbook's expected state."""

from __future__ import annotations

import httpx
import pytest
from typer.testing import CliRunner

import remediation_client as operations
from contracts.models import (
    Criterion,
    LaunchGuardVerifyRequest,
    PostureObservation,
    PrecheckObservation,
    SubmitObservation,
)
from starters.cli import app
from tests.helpers import incident_in
from tests.histories import keep_history
from workflows.launch_guard import launch_guard_criteria

from .conftest import World

RESTRICTED = PostureObservation(
    org_id="o", state="restricted", reason="prepaid_balance_depleted", block_new_launches=True
)
BLOCKER = PrecheckObservation(sku="s", billing_severity="blocker", billing_reason="prepaid_balance_depleted")
REFUSED = SubmitObservation(status_code=402, code="insufficient_balance")


def failed(criteria: list[Criterion]) -> set[str]:
    return {c.name for c in criteria if not c.passed}


def test_expected_restricted_state_field_by_field() -> None:
    assert failed(launch_guard_criteria("restricted", RESTRICTED, BLOCKER, REFUSED)) == set()
    # Each deviation from the runbook's expected state fails exactly its own criterion.
    other_reason = RESTRICTED.model_copy(update={"reason": "overdue_invoice"})
    assert failed(launch_guard_criteria("restricted", other_reason, BLOCKER, REFUSED)) == {"posture_reason"}
    not_blocking = RESTRICTED.model_copy(update={"block_new_launches": False})
    assert failed(launch_guard_criteria("restricted", not_blocking, BLOCKER, REFUSED)) == {
        "effects.block_new_launches"
    }
    accepted = SubmitObservation(status_code=202)
    assert failed(launch_guard_criteria("restricted", RESTRICTED, BLOCKER, accepted)) == {"submit_refused"}
    warning = PrecheckObservation(sku="s", billing_severity="warning")
    assert failed(launch_guard_criteria("restricted", RESTRICTED, warning, None)) == {
        "precheck_billing_severity"
    }


def test_recovery_accepts_cleared_or_downgraded() -> None:
    ok = PrecheckObservation(sku="s", billing_severity="ok")
    for state in ("none", "warning"):
        posture = PostureObservation(org_id="o", state=state, block_new_launches=False)
        assert failed(launch_guard_criteria("recovered", posture, ok, None)) == set()
    assert failed(launch_guard_criteria("recovered", RESTRICTED, BLOCKER, None)) == {
        "posture_state",
        "effects.block_new_launches",
        "precheck_billing_severity",
    }


@pytest.mark.asyncio(loop_scope="session")
async def test_verify_restricted_then_recovered_through_the_admin_api(world: World) -> None:
    incident = await incident_in(world, "prepaid-depleted", "lg")
    org = incident.scope["org_id"]
    project = await world.db.fetchval("SELECT id FROM billing.projects WHERE org_id = $1 LIMIT 1", org)

    def ask(expect: str, **extra: object) -> LaunchGuardVerifyRequest:
        return LaunchGuardVerifyRequest.model_validate(
            {
                "correlation_id": incident.correlation_id,
                "org_id": org,
                "project_id": project,
                "expect": expect,
                "requested_by": "ic-dana",
                **extra,
            }
        )

    workflow_id, report = await operations.verify_launch_guard(
        world.client, world.settings, ask("restricted")
    )
    assert report.passed, report.criteria
    assert report.submit == REFUSED
    assert report.posture.state == "restricted" and report.precheck.billing_severity == "blocker"
    # The verification is its own workflow in the UI, findable by org and correlation id.
    description = await world.client.get_workflow_handle(workflow_id).describe()
    assert description.workflow_type == "LaunchGuardVerification"
    await keep_history(world.client.get_workflow_handle(workflow_id), "launch_guard_restricted")

    # Not recovered yet: the report names every criterion that does not hold.
    _, early = await operations.verify_launch_guard(world.client, world.settings, ask("recovered"))
    assert not early.passed
    assert failed(early.criteria) == {
        "posture_state",
        "effects.block_new_launches",
        "precheck_billing_severity",
    }

    # Recovery: downgrade the restriction through the admin billing API, then the precheck says ok.
    async with httpx.AsyncClient(
        base_url=world.settings.resolved_billing_api_url(),
        headers={"Authorization": f"Bearer {world.settings.billing_api_token.get_secret_value()}"},
    ) as api:
        answer = await api.post(
            f"/api/v1/admin/billing/restrictions/{org}/clear",
            json={"mode": "downgrade", "actor": "ic-dana", "idempotency_key": f"lg-{org}"},
        )
        assert answer.status_code == 200, answer.text
    _, late = await operations.verify_launch_guard(world.client, world.settings, ask("recovered"))
    assert late.passed, late.criteria
    assert late.posture.state == "warning" and late.submit is None  # never submits a real launch when open

    # Expecting a restriction that is gone fails, naming what differs (and submit was accepted).
    _, wrong = await operations.verify_launch_guard(world.client, world.settings, ask("restricted"))
    assert not wrong.passed
    assert "submit_refused" in failed(wrong.criteria)


@pytest.mark.asyncio(loop_scope="session")
async def test_project_of_another_org_is_refused(world: World) -> None:
    incident = await incident_in(world, "prepaid-depleted", "lx")
    other = await incident_in(world, "prepaid-depleted", "ly")
    org = incident.scope["org_id"]
    foreign = await world.db.fetchval(
        "SELECT id FROM billing.projects WHERE org_id = $1 LIMIT 1", other.scope["org_id"]
    )
    assert foreign is not None
    request = LaunchGuardVerifyRequest(
        correlation_id="lx", org_id=org, project_id=foreign, requested_by="ic-dana"
    )
    with pytest.raises(operations.OperationError, match=f"project {foreign} belongs to org"):
        await operations.verify_launch_guard(world.client, world.settings, request)


def test_cli_refuses_malformed_input_naming_the_field() -> None:
    result = CliRunner().invoke(app, ["verify-launch-guard", "--org", "org 1; drop"])
    assert result.exit_code == 2
    assert "org_id" in result.output
    result = CliRunner().invoke(app, ["verify-launch-guard", "--org", "o1", "--expect", "sideways"])
    assert result.exit_code == 2
    assert "expect" in result.output
