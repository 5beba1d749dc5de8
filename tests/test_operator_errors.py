"""What an operator reads when input is wrong (issue 13): plan-hash prefixes refused by name and audited,
rules in words instead of regular expressions, long values cut short."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

import remediation_client as operations
from alert_intake.mapping import AlertRefused, load_mapping
from contracts.models import Phase, Trigger
from starters.cli import app
from tests.helpers import eventually, start_dispute, wait_phase
from workflows.input_errors import ECHO_LIMIT

from .conftest import APPROVER_KEYS, World


def _write_key(directory: Path, name: str) -> Path:
    path = directory / f"{name}.key"
    path.write_bytes(
        APPROVER_KEYS[name].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


@pytest.mark.asyncio(loop_scope="session")
async def test_plan_hash_prefixes_are_refused_by_name_and_audited(world: World, tmp_path: Path) -> None:
    _, handle = await start_dispute(world, "ph")
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert view.plan is not None
    current = view.plan.plan_hash
    stale = ("0" if current[0] != "0" else "1") + current[1:12]
    cases = {
        stale: f"stale plan: the plan awaiting approval is {current[:12]}…, not {stale[:12]}…",
        current[:5]: f"plan hash prefix '{current[:5]}' is too short to be unambiguous",
        "not-a-hash!": "--plan must be the plan hash or a prefix of at least 8",
    }
    messages = []
    for given, expected in cases.items():
        with pytest.raises(operations.OperationError) as err:
            await operations.decide_plan(
                world.client,
                world.settings,
                handle.id,
                plan_hash=given,
                approver="alice",
                decision="approve",
                comment="",
                key_path=_write_key(tmp_path, "alice"),
            )
        message = str(err.value)
        assert expected in message, message
        assert "\n" not in message and "pydantic" not in message and "pattern" not in message
        messages.append(message.removeprefix("refused: "))
    # Each refusal is in the approvals audit, with the reason the approver read.
    audited = await world.db.fetch(
        """SELECT a.refusal_reason, a.approver FROM remediation.approvals a JOIN remediation.runs r
           USING (run_id) WHERE r.workflow_id = $1 AND NOT a.accepted ORDER BY a.id""",
        handle.id,
    )
    assert [r["refusal_reason"] for r in audited] == messages
    assert {r["approver"] for r in audited} == {"alice"}
    # A prefix of 8 characters names the plan: the signed approval is accepted.
    await operations.decide_plan(
        world.client,
        world.settings,
        handle.id,
        plan_hash=current[:8].upper(),
        approver="alice",
        decision="approve",
        comment="prefix",
        key_path=_write_key(tmp_path, "alice"),
    )
    # The workflow audits accepted approvals from its own coroutine: wait for the row.
    accepted = await eventually(
        lambda: world.db.fetchval(
            """SELECT a.plan_hash FROM remediation.approvals a JOIN remediation.runs r USING (run_id)
               WHERE r.workflow_id = $1 AND a.accepted""",
            handle.id,
        ),
        what="the accepted approval's audit row",
    )
    assert accepted == current


def test_cli_input_errors_say_the_rule_in_words_and_cut_long_values() -> None:
    runner = CliRunner()
    huge = "x" * 10_000
    for value, shown in (("", "(got '')"), (huge, f"(got '{'x' * ECHO_LIMIT}'… (10,000 characters))")):
        result = runner.invoke(app, ["start", "--correlation-id", value, "--org", "org-1", "--as", "dana"])
        assert result.exit_code == 2, result.output
        assert "correlation_id: must be 1–128 characters: letters, digits, . _ : -" in result.output
        assert shown in result.output
        assert "pattern" not in result.output and len(result.output) < 300
    result = runner.invoke(
        app, ["start", "--correlation-id", "c-1", "--org", "org-1", "--trace-id", "zz", "--as", "dana"]
    )
    assert (
        result.exit_code == 2 and "trace_id: must be 1–32 hexadecimal characters (got 'zz')" in result.output
    )


def test_alert_intake_refusals_say_the_rule_in_words() -> None:
    mapping = load_mapping()
    with pytest.raises(AlertRefused) as err:
        mapping.request(Trigger.RECONCILE_FAILED, {"org_id": "o" * 500}, default_correlation="c-1")
    message = str(err.value)
    assert "must be 1–128 characters" in message and "(500 characters)" in message and len(message) < 300


def test_an_apply_batch_of_zero_is_refused_before_apply_starts() -> None:
    # Apply advances by ranges of the batch size: 0 would never advance, so it is refused by name.
    from pydantic import ValidationError

    from contracts.models import ApplyRequest, RunRef, Scope

    ref = RunRef(run_id="r1", workflow_id="remediation-global", correlation_id="c1", scope=Scope())
    for size in (0, -5, 10_001):
        with pytest.raises(ValidationError, match="batch_size"):
            ApplyRequest(ref=ref, plan_id="p1", plan_hash="h", actor="a", approvers=[], batch_size=size)
    assert (
        ApplyRequest(ref=ref, plan_id="p1", plan_hash="h", actor="a", approvers=[], batch_size=1).batch_size
        == 1
    )
