"""Billing data is encrypted in workflow history, and secrets appear nowhere a person or a log can read."""

from __future__ import annotations

import base64
import json
import logging
import os
import uuid
from pathlib import Path

import pytest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

import remediation_client as operations
from config import Settings
from config.approver_keys import ApproverKeyError, new_key_pair
from contracts import names
from contracts.models import Phase, RemediationRequest, RemediationResult, Scope, Trigger
from tests.conftest import client_with, make_world
from tests.helpers import decision, incident_in, start, start_dispute, wait_phase
from worker.payload_codec import EncryptionCodec, PayloadKeyError, payload_keys, with_codec
from workflows.remediation import BillingRemediationWorkflow
from workflows.sandbox import workflow_runner

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_history_payloads_are_encrypted(
    pg_settings: Settings, template_db: str, state_root: Path, temporal_env: WorkflowEnvironment
) -> None:
    key = os.urandom(32)
    converter = with_codec(pydantic_data_converter, [key])
    encrypted = client_with(temporal_env.client, data_converter=converter)
    async for world in make_world(pg_settings, template_db, state_root, encrypted):
        _, handle = await start_dispute(world, "enc", dry_run=True)
        result = await handle.result()
        assert result.outcome is Phase.DRY_RUN_COMPLETE  # decoded transparently by the keyed client
        # Read without the key (as anyone with namespace access would): no billing data visible.
        raw = await temporal_env.client.get_workflow_handle(handle.id).fetch_history()
        text = raw.to_json()
        assert (
            "binary/encrypted"
            in base64.b64decode(
                json.loads(text)["events"][0]["workflowExecutionStartedEventAttributes"]["input"]["payloads"][
                    0
                ]["metadata"]["encoding"]
            ).decode()
        )
        # Ids stay readable by design (workflow id, search attributes: what the UI lists by); the
        # billing data in payloads (plan, amounts, findings, diagnosis) does not.
        assert result.plan is not None
        for secret in (result.plan.plan_hash, "close_orphan_usage", "allocations", "release"):
            assert secret not in text, secret
        # The keyed replayer still proves determinism.
        replayer = Replayer(
            workflows=[BillingRemediationWorkflow],
            data_converter=converter,
            workflow_runner=workflow_runner(),
        )
        assert (await replayer.replay_workflow(raw, raise_on_replay_failure=False)).replay_failure is None
        # A client with the wrong key cannot read it.
        wrong = client_with(
            temporal_env.client, data_converter=with_codec(pydantic_data_converter, [os.urandom(32)])
        )
        with pytest.raises(Exception, match="not configured"):
            await wrong.get_workflow_handle(handle.id, result_type=RemediationResult).result()


async def test_payload_key_settings_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(PayloadKeyError, match="PAYLOAD_ENCRYPTION is on but there is no key"):
        payload_keys(Settings(REMEDIATION_STATE_DIR=tmp_path))
    with pytest.raises(PayloadKeyError, match="32 bytes"):
        payload_keys(Settings(PAYLOAD_KEY=base64.b64encode(b"short").decode()))
    assert payload_keys(Settings(PAYLOAD_ENCRYPTION="off")) is None
    two = [os.urandom(32), os.urandom(32)]
    text = "\n".join(base64.b64encode(k).decode() for k in two)
    assert payload_keys(Settings(PAYLOAD_KEY=text)) == two


async def test_secrets_never_reach_history_evidence_records_logs_or_errors(
    pg_settings: Settings,
    template_db: str,
    state_root: Path,
    temporal_env: WorkflowEnvironment,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    password = "pw-" + uuid.uuid4().hex
    token = "tok-" + uuid.uuid4().hex
    async for world in make_world(
        pg_settings, template_db, state_root, temporal_env.client, password=password, BILLING_API_TOKEN=token
    ):
        incident = await incident_in(world, "prepaid-depleted", "sec")
        handle = await start(
            world,
            RemediationRequest(
                correlation_id=incident.correlation_id,
                scope=Scope(org_id=incident.scope["org_id"]),
                requested_by="ic",
                trigger=Trigger.PREPAID_DEPLETED,
            ),
        )
        view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
        await handle.execute_update(names.UPDATE_APPROVE, decision(view, "bob"))
        result = await handle.result()
        assert result.outcome is Phase.COMPLETED  # the admin API (bearer token) was really used
        evidence = json.dumps(await operations.evidence(world.settings, handle.id), default=str)
        records = [
            str(r[0])
            for table in (
                "runs",
                "timeline",
                "approvals",
                "applied_actions",
                "evidence",
                "snapshots",
                "plans",
            )
            for r in await world.db.fetch(f"SELECT row_to_json(t)::text FROM remediation.{table} t")
        ]
        history = (await handle.fetch_history()).to_json()
        # Error paths: an unreachable database and a refused token name the problem, not the secret.
        errors = []
        bad_db = Settings(DATABASE_URL=f"postgresql://postgres:{password}@127.0.0.1:1/nowhere")
        with pytest.raises(OSError) as db_err:
            await operations.preflight(bad_db, RemediationRequest(correlation_id="c", requested_by="ic"))
        errors.append(str(db_err.value))
        errors.append(repr(world.settings))
        errors.append(str(world.settings.model_dump()))
        assert records and evidence and history
        out = capsys.readouterr()
        haystacks = {
            "history": history,
            "evidence": evidence,
            "records": "\n".join(records),
            "logs": caplog.text,
            "output": out.out + out.err,
            "errors": "\n".join(errors),
        }
        for where, text in haystacks.items():
            assert password not in text, f"database password leaked into {where}"
            assert token not in text, f"API token leaked into {where}"


async def test_tampered_payloads_and_bad_key_material_fail_clearly(tmp_path: Path) -> None:
    codec = EncryptionCodec([os.urandom(32)])
    (sealed,) = await codec.encode(
        pydantic_data_converter.payload_converter.to_payloads([{"amount_minor": 1}])
    )
    sealed.data = sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    with pytest.raises(PayloadKeyError, match="failed authentication"):
        await codec.decode([sealed])
    with pytest.raises(ValueError, match="32-byte Ed25519"):
        Settings(APPROVERS=[{"name": "alice", "public_key": base64.b64encode(b"short").decode()}])
    with pytest.raises(ApproverKeyError, match="approver name"):
        new_key_pair(tmp_path, "../escape")
    assert not (tmp_path.parent / "escape.key").exists()
