"""Tamper evidence: the audit chain and the signed evidence pack, checked by `remediate verify-evidence`'s code.

Every row is changed back after its check, so each check starts from a verified run.
"""

from __future__ import annotations

import json

import pytest

import remediation_client as operations
from contracts.models import Phase
from tests.conftest import World
from tests.helpers import approve_quorum, incident_in, request_for, start, verify_evidence, wait_phase

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_edits_deletions_and_reordering_are_named_and_an_untouched_run_verifies(world: World) -> None:
    incident = await incident_in(world, "user-dispute", "ev")
    handle = await start(world, request_for(incident, requested_by="ic-dana"))
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    await approve_quorum(handle, view)
    result = await handle.result()
    assert result.outcome is Phase.COMPLETED, result
    wid, run_id = handle.id, result.run_id
    assert await verify_evidence(world, wid) == []
    doc = await operations.evidence(world.settings, wid)
    chained = await world.db.fetchval(
        "SELECT count(*) FROM remediation.audit_chain WHERE run_id = $1", run_id
    )
    assert 0 < doc["integrity"]["chain_length"] <= chained and doc["integrity"]["signature"]

    # An applied action edited (its outcome), then put back.
    action = await world.db.fetchrow(
        "SELECT plan_id, seq, outcome FROM remediation.applied_actions WHERE plan_id = $1 ORDER BY seq LIMIT 1",
        view.plan.plan_id if view.plan else "",
    )
    await world.db.execute(
        "UPDATE remediation.applied_actions SET outcome = 'skipped_stale' WHERE plan_id = $1 AND seq = $2",
        action["plan_id"],
        action["seq"],
    )
    problems = await verify_evidence(world, wid)
    assert len(problems) == 1 and "applied_actions" in problems[0] and "edited or moved" in problems[0]
    assert f'"seq": {action["seq"]}' in problems[0]
    await world.db.execute(
        "UPDATE remediation.applied_actions SET outcome = $3 WHERE plan_id = $1 AND seq = $2",
        action["plan_id"],
        action["seq"],
        action["outcome"],
    )
    assert await verify_evidence(world, wid) == []

    # A timeline row deleted, then restored exactly (triggers off, so the chain is not extended).
    timeline = await world.db.fetch(
        "SELECT * FROM remediation.timeline WHERE run_id = $1 ORDER BY id LIMIT 3", run_id
    )
    gone = timeline[1]
    await world.db.execute("DELETE FROM remediation.timeline WHERE id = $1", gone["id"])
    problems = await verify_evidence(world, wid)
    assert len(problems) == 1 and f'"id": {gone["id"]}' in problems[0] and "gone" in problems[0]
    async with world.db.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            """INSERT INTO remediation.timeline (id, run_id, at, phase, actor, message, detail, event_key)
               OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
            *(gone[c] for c in ("id", "run_id", "at", "phase", "actor", "message", "detail", "event_key")),
        )
    assert await verify_evidence(world, wid) == []

    # Two timeline rows reordered (their times swapped), then swapped back.
    first, second = timeline[0], timeline[2]

    async def swap(a: object, b: object) -> None:
        await world.db.execute(
            "UPDATE remediation.timeline SET at = CASE id WHEN $1 THEN $3::timestamptz ELSE $4::timestamptz END"
            " WHERE id IN ($1, $2)",
            first["id"],
            second["id"],
            a,
            b,
        )

    await swap(second["at"], first["at"])
    problems = await verify_evidence(world, wid)
    assert len(problems) == 1 and f'"id": {first["id"]}' in problems[0]
    await swap(first["at"], second["at"])
    assert await verify_evidence(world, wid) == []

    # The stored pack itself edited: its digest no longer matches what was signed.
    edited = doc | {"customer_summary": "Nothing happened."}
    await world.db.execute(
        "UPDATE remediation.evidence SET document = $2 WHERE run_id = $1", run_id, json.dumps(edited)
    )
    assert await verify_evidence(world, wid) == [
        "the evidence document was changed after it was signed",
        "the signature does not verify under the trusted key",
    ]
    await world.db.execute(
        "UPDATE remediation.evidence SET document = $2 WHERE run_id = $1", run_id, json.dumps(doc)
    )
    assert await verify_evidence(world, wid) == []
