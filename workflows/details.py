"""What the Temporal UI shows of a remediation: the runbook steps (static) and the live details markdown."""

from __future__ import annotations

from contracts.models import (
    AlertNotice,
    BlastRadius,
    CheckResult,
    Phase,
    RemediationRequest,
    VerificationResult,
)
from workflows.approval import ApprovalState

STEPS_MARKDOWN = """**Runbook: billing worker failure and reconciliation drift**

1. Diagnose: blast radius; Postgres, NATS consumer and outbox health; Loki logs and Tempo trace for the
   correlation id; event sequence; data consistency.
2. Freeze risky manual adjustments when the blast radius is widespread (always lifted at the end).
3. Reconcile: missing open usage, orphan open usage, unbilled closed usage, payment drift; ask the payment
   provider about every payment finding (wait while it does not answer); build a plan.
4. Wait for approval of the plan's content hash (quorum for widespread or large plans).
5. Remediate exactly the approved actions (idempotent, audited).
6. Verify the recovery criteria; on failure wait for a decision.
7. Capture evidence (timeline, before/after queries, scope, customer summary, follow-ups).
"""


def details_markdown(
    *,
    phase: Phase,
    request: RemediationRequest,
    blast: BlastRadius | None,
    frozen: bool,
    alerts: list[AlertNotice],
    diagnosis: list[CheckResult],
    drift: dict[str, int],
    approval: ApprovalState,
    approvals_needed: int,
    stalled: str | None,
    verification: VerificationResult | None,
    payments: dict[str, int] | None = None,
    waiting: str | None = None,
) -> str:
    """Markdown shown live in the Temporal UI: phase, scope, alerts, diagnosis, drift, plan, verdict."""
    lines = [f"### Phase: `{phase.value}`", ""]
    lines.append(
        f"- **Scope:** {request.scope.describe()} · **Trigger:** {request.trigger.value}"
        f" · **Correlation id:** `{request.correlation_id}`"
    )
    lines.append(f"- **Requested by:** {request.requested_by}{' · dry run' if request.dry_run else ''}")
    if blast:
        lines.append(f"- **Blast radius:** {blast.value}{' · manual adjustments frozen' if frozen else ''}")
    if alerts:
        lines.append("")
        lines.append("**Alerts**")
        lines += [
            f"- {a.name} **{a.status}** ({a.source}, `{a.fingerprint[:16]}`)"
            + (f" · {a.summary}" if a.summary else "")
            for a in alerts
        ]
    if diagnosis:
        lines.append("")
        lines.append("**Diagnosis**")
        lines += [f"- {c.check}: **{c.status}** · {c.headline}" for c in diagnosis]
    if drift:
        lines.append("")
        lines.append("**Drift** " + " · ".join(f"{k}: {v}" for k, v in sorted(drift.items())))
    if payments:
        lines.append("")
        lines.append(
            "**Payment provider verdicts** " + " · ".join(f"{k}: {v}" for k, v in sorted(payments.items()))
        )
    if waiting is not None:
        lines.append("")
        lines.append(f"**Waiting on the payment provider:** {waiting}")
    plan = approval.plan
    if plan is not None:
        lines.append("")
        lines.append(
            f"**Plan** `{plan.plan_id}` · hash `{plan.plan_hash[:12]}` · {plan.action_count} actions"
            f" · debits {plan.debit_total_minor} · credits {plan.credit_total_minor} (minor units)"
        )
        if plan.findings_from:
            lines.append(f"- Findings from: {plan.findings_from}")
        needed = approvals_needed
        approved = ", ".join(approval.approved_by) or "none"
        lines.append(
            f"- Approvals: {approved} ({len(approval.approved_by)}/{needed})"
            + (f" · rejected by {approval.rejected_by}" if approval.rejected_by else "")
        )
    if stalled is not None:
        lines.append("")
        lines.append(f"**Stopped, waiting for a decision (retry or hand_off):** {stalled}")
    if verification is not None:
        lines.append("")
        lines.append(f"**Verification: {'PASSED' if verification.passed else 'FAILED'}**")
        for c in verification.criteria:
            lines.append(f"- {'✅' if c.passed else '❌'} {c.name}: {c.detail}")
            lines += [f"  - left: {e.describe()}" for e in c.left]
    return "\n".join(lines)
