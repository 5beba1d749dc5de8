"""The evidence's incident timeline, onset to recovery, each entry with its source, and the durations.

Onset is the first failing log line for the correlation id (else the first drifted record), detection
the first alert (else the remediation's start), then the approval that completed the quorum, the end
of apply (mitigated) and the passed verification (recovered).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from contracts.models import EvidenceRequest

FIRST_DRIFTED = """
SELECT min(t) FROM (
    SELECT a.activated_at AS t FROM remediation.findings f JOIN billing.allocations a ON a.id = f.allocation_id
    WHERE f.run_id = $1 AND f.pass = 0 AND f.kind = 'missing_open_usage'
    UNION ALL
    SELECT coalesce(a.released_at, a.releasing_at) FROM remediation.findings f
    JOIN billing.allocations a ON a.id = f.allocation_id
    WHERE f.run_id = $1 AND f.pass = 0 AND f.kind IN ('orphan_open_usage', 'unbilled_closed_usage')
    UNION ALL
    SELECT p.created_at FROM remediation.findings f JOIN billing.payment_sessions p ON p.id = f.entity_id
    WHERE f.run_id = $1 AND f.pass = 0 AND f.kind = 'payment_drift'
) x"""


async def incident_timeline(
    pool: asyncpg.Pool, request: EvidenceRequest, run: asyncpg.Record | None
) -> tuple[list[dict[str, Any]], dict[str, int | None]]:
    """(entries sorted by time, durations in seconds between the incident's milestones)."""
    run_id = request.ref.run_id
    entries: list[tuple[datetime, str, str]] = [(m.at, m.source, m.event) for m in request.marks]
    first_drifted = await pool.fetchval(FIRST_DRIFTED, run_id)
    if first_drifted is not None:
        entries.append((first_drifted, "billing data", "first drifted record a finding concerns"))
    if run is not None:
        entries.append((run["started_at"], "remediation", f"remediation started by {run['requested_by']}"))
    rows = await pool.fetch(
        "SELECT at, phase, actor, message, event_key FROM remediation.timeline WHERE run_id = $1 ORDER BY at, id",
        run_id,
    )
    entries += [(r["at"], "remediation", f"[{r['phase']}] {r['actor']}: {r['message']}") for r in rows]
    approvals = await pool.fetch(
        """SELECT at, approver, decision, accepted, refusal_reason FROM remediation.approvals
           WHERE run_id = $1 ORDER BY at, id""",
        run_id,
    )
    entries += [
        (
            a["at"],
            "approval",
            f"{a['approver']} {a['decision']}"
            + ("" if a["accepted"] else f" refused: {a['refusal_reason']}"),
        )
        for a in approvals
    ]
    verified_at = await pool.fetchval(
        "SELECT taken_at FROM remediation.snapshots WHERE run_id = $1 AND label = 'after'", run_id
    )
    if verified_at is not None and request.verification is not None:
        entries += [
            (verified_at, "verification", f"{c.name} {'passed' if c.passed else 'FAILED'}: {c.detail}")
            for c in request.verification.criteria
        ]
    entries += await _freeze_entries(pool, f"{request.ref.workflow_id}/{run_id}")
    entries.append(
        (await pool.fetchval("SELECT clock_timestamp()"), "remediation", f"outcome: {request.outcome}")
    )
    entries.sort(key=lambda e: e[0])

    loki_first = [m.at for m in request.marks if m.source == "loki" and m.event.startswith("first failing")]
    onset = min(loki_first) if loki_first else first_drifted
    alerts = [
        m.at for m in request.marks if m.source in ("alertmanager", "nats") and m.event.endswith("firing")
    ]
    detected = min([*alerts, run["started_at"]]) if run is not None else (min(alerts) if alerts else None)
    accepted = [a["at"] for a in approvals if a["accepted"] and a["decision"] == "approve"]
    approved = max(accepted) if accepted else None
    applied = [r["at"] for r in rows if r["event_key"] and ":apply:" in r["event_key"]]
    mitigated = max(applied) if applied else None
    passed = request.verification is not None and request.verification.passed
    recovered = verified_at if passed else None

    def between(start: datetime | None, end: datetime | None) -> int | None:
        return int((end - start).total_seconds()) if start is not None and end is not None else None

    durations = {
        "time_to_detect_s": between(onset, detected),
        "time_to_approve_s": between(detected, approved),
        "time_to_mitigate_s": between(approved, mitigated),
        "time_to_recover_s": between(mitigated, recovered),
    }
    return [
        {"at": at.isoformat(), "source": source, "event": event} for at, source, event in entries
    ], durations


async def _freeze_entries(pool: asyncpg.Pool, freeze_id: str) -> list[tuple[datetime, str, str]]:
    """The run's manual-adjustment freeze and its lifting, as the admin API recorded them."""
    try:
        row = await pool.fetchrow(
            "SELECT frozen_at, frozen_by, lifted_at, lifted_by FROM billing.adjustment_freezes WHERE freeze_id = $1",
            freeze_id,
        )
    except asyncpg.UndefinedTableError:  # the admin API keeps its freezes elsewhere
        return []
    if row is None:
        return []
    entries = [(row["frozen_at"], "admin API", f"manual adjustments frozen by {row['frozen_by']}")]
    if row["lifted_at"] is not None:
        entries.append((row["lifted_at"], "admin API", f"freeze lifted by {row['lifted_by']}"))
    return entries
