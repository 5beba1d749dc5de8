"""Text renderings for the terminal: status views and evidence packs."""

from __future__ import annotations

from typing import Any

from workflows.models import StatusView


def render_status(workflow_id: str, view: StatusView) -> str:
    """A commander's one-screen status."""
    lines = [
        f"{workflow_id}: phase {view.phase.value}"
        + (f", blast radius {view.blast_radius.value}" if view.blast_radius else "")
    ]
    if view.frozen:
        lines.append("  manual adjustments: FROZEN")
    for check in view.diagnosis:
        lines.append(f"  [{check.status:>11}] {check.check}: {check.headline}")
    if view.drift:
        lines.append("  drift: " + ", ".join(f"{k}={v}" for k, v in sorted(view.drift.items())))
    if view.plan:
        p = view.plan
        lines.append(f"  plan {p.plan_id} hash {p.plan_hash}")
        lines.append(
            f"    {p.action_count} actions: "
            + ", ".join(f"{k}={v}" for k, v in sorted(p.counts_by_kind.items()))
        )
        lines.append(f"    debits {p.debit_total_minor} / credits {p.credit_total_minor} (minor units)")
        lines.append(
            f"  approvals: {', '.join(view.approvals) or 'none'} ({len(view.approvals)}/{view.approvals_needed})"
            + (f", rejected by {view.rejected_by}" if view.rejected_by else "")
        )
    if view.verification:
        lines.append(f"  verification: {'PASSED' if view.verification.passed else 'FAILED'}")
        lines += [
            f"    {'ok  ' if c.passed else 'FAIL'} {c.name}: {c.detail}" for c in view.verification.criteria
        ]
    return "\n".join(lines)


def render_evidence_markdown(doc: dict[str, Any]) -> str:
    """The evidence pack as markdown for tickets and finance."""
    run = doc["run"]
    out = [
        f"# Remediation evidence: {run['workflow_id']}",
        "",
        f"- Outcome: **{run['outcome']}** · blast radius: {run['blast_radius']} · trigger: {run['trigger']}",
        f"- Correlation id: `{run['correlation_id']}` · trace id: `{run['trace_id']}`",
        f"- Requested by: {run['requested_by']} · run id `{run['run_id']}`",
        "",
        "## Customer-facing summary",
        "",
        doc["customer_summary"],
        "",
        "## Impacted scope",
        "",
    ]
    out += [
        f"- org {i['org_id']} ({i['currency']}): projects {', '.join(i['projects']) or '-'}; users "
        f"{', '.join(i['users']) or '-'}; {i['findings']} findings"
        for i in doc["impacted"]
    ] or ["- none"]
    out += ["", "## Timeline", "", "| at | phase | actor | event |", "|---|---|---|---|"]
    out += [f"| {t['at']} | {t['phase']} | {t['actor']} | {t['message']} |" for t in doc["timeline"]]
    plan = doc.get("plan")
    if plan:
        out += [
            "",
            "## Plan",
            "",
            f"`{plan['plan_id']}` hash `{plan['plan_hash']}`: {plan['action_count']} actions,"
            f" debits {plan['debit_total_minor']}, credits {plan['credit_total_minor']} (minor units)",
        ]
    out += ["", "## Approvals", ""]
    out += [
        f"- {a['approver']} {a['decision']} via {a['via']}: "
        + ("accepted" if a["accepted"] else f"refused ({a['refusal_reason']})")
        + (f" — {a['comment']}" if a["comment"] else "")
        for a in doc["approvals"]
    ] or ["- none"]
    out += ["", "## Query evidence (before / after)", ""]
    for label in ("before", "after"):
        snap = doc["query_evidence"].get(label)
        if snap:
            out.append(
                f"- **{label}**: usage {snap['usage_records']}; ledger {snap['ledger_entries']};"
                f" drift {snap['drift']}"
            )
    verification = doc.get("verification")
    if verification:
        out += ["", f"## Verification: {'PASSED' if verification['passed'] else 'FAILED'}", ""]
        out += [
            f"- {'✅' if c['passed'] else '❌'} {c['name']}: {c['detail']}" for c in verification["criteria"]
        ]
    out += ["", "## Follow-up tasks", ""] + ([f"- [ ] {f}" for f in doc["follow_ups"]] or ["- none"])
    return "\n".join(out) + "\n"
