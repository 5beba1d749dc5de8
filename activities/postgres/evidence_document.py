"""The evidence pack's document: everything the runbook's "Evidence to Capture" lists, read from Postgres."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import asyncpg

from activities.postgres.incident_timeline import incident_timeline
from activities.postgres.plan import PLAN_WITH_SOURCE
from contracts.models import ApplyOutcome, EvidenceRequest, format_money, sql_list
from database.plan_customers import balances_after_apply

FOLLOW_UPS = {
    "nats_consumer": "Alert on billing-worker consumer stalls (pending > 0 with no ack for 5 min) and page on-call.",
    "outbox_relay": "Alert on outbox age >= 60 s and add relay liveness to the billing worker's health check.",
    "missing_open_usage": "Make usage-record creation part of the provisioning.active handler's transaction.",
    "orphan_open_usage": "Close usage records in the same transaction as the allocation's release.",
    "unbilled_closed_usage": "Post the usage debit in the same transaction that closes the usage record.",
    "payment_drift": "Make the payment webhook link the ledger entry atomically; alert on failed_reconcile.",
}


async def build_evidence(pool: asyncpg.Pool, request: EvidenceRequest) -> dict[str, Any]:
    """The evidence document: timeline, before/after queries, scope, customer summary, follow-ups."""
    ref = request.ref
    run = await pool.fetchrow("SELECT * FROM remediation.runs WHERE run_id = $1", ref.run_id)
    timeline = await pool.fetch(
        "SELECT at, phase, actor, message FROM remediation.timeline WHERE run_id = $1 ORDER BY at, id",
        ref.run_id,
    )
    snapshots = {
        r["label"]: json.loads(r["data"])
        for r in await pool.fetch(
            "SELECT label, data FROM remediation.snapshots WHERE run_id = $1", ref.run_id
        )
    }
    diagnoses = {}
    for r in await pool.fetch(
        "SELECT check_name, status, data FROM remediation.diagnoses WHERE run_id = $1", ref.run_id
    ):
        data = json.loads(r["data"])
        # The blast radius keeps its reasons, not a headline: they are its headline.
        reasons = data.get("reasons") if isinstance(data.get("reasons"), list) else None
        headline = "; ".join(map(str, reasons)) if reasons else "-"
        diagnoses[r["check_name"]] = {"status": r["status"], "headline": headline, **data}
    for check in request.diagnosis:
        # The run's own statement of each check wins (its status may have been re-stated after the
        # reconciliation); the figures Postgres kept for it stay beside the headline.
        diagnoses[check.check] = {
            **diagnoses.get(check.check, {}),
            **check.counts,
            "status": check.status,
            "headline": check.headline,
        } | ({"trace_ids": check.trace_ids} if check.trace_ids else {})
    approvals = [
        dict(r)
        for r in await pool.fetch(
            """SELECT at, approver, decision, comment, accepted, refusal_reason, via FROM remediation.approvals
           WHERE run_id = $1 ORDER BY at, id""",
            ref.run_id,
        )
    ]
    plan = await pool.fetchrow(PLAN_WITH_SOURCE, request.plan_id) if request.plan_id else None
    applied = (
        await pool.fetch(
            "SELECT kind, outcome, count(*) AS n FROM remediation.applied_actions WHERE plan_id = $1 GROUP BY 1, 2",
            request.plan_id,
        )
        if request.plan_id
        else []
    )
    impacted = await pool.fetch(
        """SELECT org_id, array_agg(DISTINCT project_id) FILTER (WHERE project_id IS NOT NULL) AS projects,
                  array_agg(DISTINCT user_id) FILTER (WHERE user_id IS NOT NULL) AS users, count(*) AS findings
           FROM remediation.findings WHERE run_id = $1 AND pass < 100 GROUP BY org_id ORDER BY org_id""",
        ref.run_id,
    )
    currencies = {
        r["id"]: r["currency"]
        for r in await pool.fetch(
            "SELECT id, currency FROM billing.orgs WHERE id = ANY($1::text[])",
            [r["org_id"] for r in impacted],
        )
    }
    kinds_found = {k for k, v in snapshots.get("before", {}).get("drift", {}).items() if v}
    follow_ups = [FOLLOW_UPS[k] for k in sorted(kinds_found) if k in FOLLOW_UPS]
    follow_ups += [
        FOLLOW_UPS[c]
        for c, d in sorted(diagnoses.items())
        if c in FOLLOW_UPS and d.get("status") in ("critical", "warn")
    ]
    payments = await _payment_outcomes(pool, request.plan_id)
    merged, durations = await incident_timeline(pool, request, run)
    figures = await _org_figures(pool, plan)
    follow_ups += [
        f"Payment session {p['session_id']} (provider {p['provider_ref']}): {p['reason']};"
        f" webhook {p['webhook']}. Not credited: investigate per the payments runbook."
        for p in payments
        if p["action"] == "investigate_payment"
    ]
    return {
        "schema": "billing-remediation/evidence/v1",
        "run": {
            "workflow_id": ref.workflow_id,
            "run_id": ref.run_id,
            "correlation_id": ref.correlation_id,
            "trace_id": ref.trace_id or (run["trace_id"] if run else None),
            "trigger": run["trigger"] if run else None,
            "requested_by": run["requested_by"] if run else None,
            "outcome": request.outcome,
            "blast_radius": request.blast_radius,
        },
        "scope": json.loads(run["scope"]) if run else ref.scope.model_dump(),
        "timeline": [
            {
                "at": r["at"].isoformat(),
                "phase": r["phase"],
                "actor": r["actor"],
                "message": r["message"],
                "correlation_id": ref.correlation_id,
                "trace_id": ref.trace_id,
            }
            for r in timeline
        ],
        "diagnosis": diagnoses,
        "query_evidence": snapshots,
        "plan": None
        if plan is None
        else {
            "plan_id": plan["plan_id"],
            "plan_hash": plan["plan_hash"],
            "action_count": plan["action_count"],
            "debit_total_minor": plan["debit_total_minor"],
            "credit_total_minor": plan["credit_total_minor"],
            "counts_by_kind": json.loads(plan["counts_by_kind"]),
        }
        | ({"findings_from": plan["findings_from"]} if plan["findings_from"] else {}),
        "approvals": approvals,
        "applied": [{"kind": r["kind"], "outcome": r["outcome"], "count": int(r["n"])} for r in applied],
        "skipped": await _skipped(pool, ref.run_id),
        "verification": request.verification.model_dump() if request.verification else None,
        "impacted": [
            {
                "org_id": r["org_id"],
                "currency": currencies.get(r["org_id"], "USD"),
                "projects": r["projects"] or [],
                "users": r["users"] or [],
                "findings": int(r["findings"]),
            }
            for r in impacted
        ],
        "incident_timeline": merged,
        "durations": durations,
        "payments": payments,
        "customer_summary": _customer_summary(request, figures, currencies),
        "customer_summaries": await _customer_summaries(pool, request, figures, currencies),
        "follow_ups": follow_ups,
        "reversal": await _reversal(pool, ref.run_id),
        "balances": await _balances(pool, plan),
    }


async def _reversal(pool: asyncpg.Pool, run_id: str) -> dict[str, Any] | None:
    """The run this run reverses (a reversal's evidence names its original), or None."""
    row = await pool.fetchrow(
        """SELECT original_workflow_id AS workflow_id, original_run_id AS run_id, scope::text AS scope, reason
           FROM remediation.reversals WHERE run_id = $1""",
        run_id,
    )
    if row is None:
        return None
    return dict(row) | {"scope": json.loads(row["scope"])}


async def _balances(pool: asyncpg.Pool, plan: Any) -> list[dict[str, Any]]:
    """Per customer of an applied plan: balance before, predicted, actual, and the difference explained."""
    if plan is None or plan["status"] != "applied":
        return []
    return [
        row
        | {
            "explained": "as predicted"
            if row["difference"] == 0
            else f"differs by {row['difference']}: {-row['not_applied']} from actions not applied,"
            f" {row['others']} from entries other writers posted meanwhile"
        }
        for row in await balances_after_apply(pool, plan["plan_id"])
    ]


SKIPPED_LISTED = 1000  # skipped actions the evidence lists one by one (the counts cover every one)


SKIP_OUTCOMES = sql_list(
    (
        ApplyOutcome.ALREADY_APPLIED,
        ApplyOutcome.SKIPPED_STALE,
        ApplyOutcome.SKIPPED_GONE,
        ApplyOutcome.SKIPPED_PROVIDER,
    )
)


async def _skipped(pool: asyncpg.Pool, run_id: str) -> list[dict[str, Any]]:
    """Every approved action of the run's plans that was not applied, with the reason its audit row gives."""
    rows = await pool.fetch(
        f"""SELECT aa.plan_id, aa.seq, aa.kind, pa.entity_type, pa.entity_id, pa.org_id, aa.outcome,
                   coalesce(aa.after->>'skipped', 'no reason recorded') AS reason
            FROM remediation.plans p
            JOIN remediation.applied_actions aa ON aa.plan_id = p.plan_id
            JOIN remediation.plan_actions pa ON pa.plan_id = aa.plan_id AND pa.seq = aa.seq
            WHERE p.run_id = $1 AND aa.outcome IN {SKIP_OUTCOMES}
            ORDER BY p.pass, aa.seq LIMIT {SKIPPED_LISTED}""",
        run_id,
    )
    return [dict(r) for r in rows]


async def _payment_outcomes(pool: asyncpg.Pool, plan_id: str | None) -> list[dict[str, Any]]:
    """Each payment action of the plan with the provider's verdict, figures and where its webhook went."""
    if not plan_id:
        return []
    rows = await pool.fetch(
        """SELECT pa.entity_id, pa.kind, pa.amount_minor, pa.params->'provider' AS provider, s.provider_ref,
                  aa.outcome
           FROM remediation.plan_actions pa
           JOIN billing.payment_sessions s ON s.id = pa.entity_id
           LEFT JOIN remediation.applied_actions aa ON aa.plan_id = pa.plan_id AND aa.seq = pa.seq
           WHERE pa.plan_id = $1 AND pa.entity_type = 'payment_session' ORDER BY pa.seq""",
        plan_id,
    )
    out = []
    for r in rows:
        provider = json.loads(r["provider"]) if r["provider"] else {}
        out.append(
            {
                "session_id": r["entity_id"],
                "provider_ref": r["provider_ref"],
                "action": r["kind"],
                "verdict": provider.get("verdict", "unchecked"),
                "reason": provider.get("reason", "no provider answer recorded"),
                "webhook": provider.get("webhook", "unknown"),
                "provider_figures": provider.get("payment"),
                "credit_minor": r["amount_minor"],
                "outcome": r["outcome"] or "not_applied",
            }
        )
    return out


class _Figures(NamedTuple):
    """What was applied for a customer (or all of them): counts and minor units."""

    corrected: int
    credits: int
    debits: int
    failed: int
    reviewed: int


async def _org_figures(pool: asyncpg.Pool, plan: asyncpg.Record | None) -> list[tuple[str, int, _Figures]]:
    """(org, planned actions, what was really applied) per impacted org, from the audit of the apply."""
    if plan is None:
        return []
    rows = await pool.fetch(
        """SELECT pa.org_id,
                  count(*) FILTER (WHERE aa.outcome = 'applied' AND pa.entity_type <> 'worker') AS corrected,
                  coalesce(sum(pa.amount_minor) FILTER (WHERE aa.outcome = 'applied' AND pa.amount_minor > 0), 0)
                      AS credits,
                  coalesce(sum(pa.amount_minor) FILTER (WHERE aa.outcome = 'applied' AND pa.amount_minor < 0), 0)
                      AS debits,
                  count(*) FILTER (WHERE pa.kind = 'mark_payment_failed' AND aa.outcome = 'applied') AS failed,
                  count(*) FILTER (WHERE pa.kind = 'investigate_payment') AS reviewed,
                  count(*) AS planned
           FROM remediation.plan_actions pa
           LEFT JOIN remediation.applied_actions aa ON aa.plan_id = pa.plan_id AND aa.seq = pa.seq
           WHERE pa.plan_id = $1 AND pa.org_id <> '*' GROUP BY pa.org_id ORDER BY pa.org_id""",
        plan["plan_id"],
    )
    return [
        (
            r["org_id"],
            int(r["planned"]),
            _Figures(
                int(r["corrected"]), int(r["credits"]), int(r["debits"]), int(r["failed"]), int(r["reviewed"])
            ),
        )
        for r in rows
    ]


async def _customer_summaries(
    pool: asyncpg.Pool,
    request: EvidenceRequest,
    figures: list[tuple[str, int, _Figures]],
    currencies: dict[str, str],
) -> list[dict[str, Any]]:
    """One summary per impacted org: only its own corrections and amounts, in its own currency."""
    out = []
    for org, planned, own in figures:
        currency = currencies.get(org) or await pool.fetchval(
            "SELECT currency FROM billing.orgs WHERE id = $1", org
        )
        out.append(
            {
                "org_id": org,
                "currency": currency or "USD",
                "corrections": own.corrected,
                "credits_minor": own.credits,
                "debits_minor": own.debits,
                "summary": _summary_text(request, planned, own, currency or "USD"),
            }
        )
    return out


def _money(minor: int, currency: str) -> str:
    return format_money(abs(minor), currency)


def _customer_summary(
    request: EvidenceRequest, figures: list[tuple[str, int, _Figures]], currencies: dict[str, str]
) -> str:
    """The whole run's summary (internal): every org's applied figures added up."""
    currency = next(iter(set(currencies.values())), "USD") if len(set(currencies.values())) <= 1 else "mixed"
    total = _Figures(*(sum(f[i] for _, _, f in figures) for i in range(len(_Figures._fields))))
    return _summary_text(request, sum(planned for _, planned, _ in figures), total, currency)


def _summary_text(request: EvidenceRequest, planned: int, figures: _Figures, currency: str) -> str:
    """What a customer reads about the corrections in ``figures``."""
    if planned == 0:
        return "We checked your billing records for this incident and found nothing that needed correcting."
    if request.outcome in ("rejected", "expired", "dry_run_complete", "cancelled"):
        return (
            "We found billing records that need correcting; no change has been made yet while the "
            "correction is reviewed."
        )
    parts = [
        f"A billing worker incident left some records out of step. We corrected {figures.corrected} record(s)."
    ]
    if figures.credits:
        parts.append(
            f"Payments totalling {_money(figures.credits, currency)} that had not reached your balance are now "
            "credited."
        )
    if figures.debits:
        parts.append(
            f"Usage totalling {_money(figures.debits, currency)} that had not been billed is now on your ledger,"
            " charged once at the normal rate for the time the resources actually ran."
        )
    if figures.failed:
        parts.append(
            f"{figures.failed} payment(s) never completed at our payment provider; they are marked failed and"
            " nothing was charged or credited for them."
        )
    if figures.reviewed:
        parts.append(
            f"{figures.reviewed} payment(s) whose status at our payment provider differs from our records are"
            " being reviewed by our payments team; your balance was not changed for them."
        )
    parts.append("No charge or credit was applied twice.")
    return " ".join(parts)
