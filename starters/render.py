"""Renderings of status views and evidence packs: terminal text, markdown and self-contained HTML."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from html import escape
from typing import Any

from contracts.models import LeftEntity, StatusView, format_money


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
    if view.payments:
        lines.append("  payment provider: " + ", ".join(f"{k}={v}" for k, v in sorted(view.payments.items())))
    if view.waiting_on_provider:
        lines.append(f"  WAITING on the payment provider: {view.waiting_on_provider}")
    if view.stalled:
        lines.append(f"  STOPPED, waiting for retry or hand-off: {view.stalled}")
    if view.plan:
        p = view.plan
        lines.append(f"  plan {p.plan_id} hash {p.plan_hash}")
        lines.append(
            f"    {p.action_count} actions: "
            + ", ".join(f"{k}={v}" for k, v in sorted(p.counts_by_kind.items()))
        )
        lines.append(f"    debits {p.debit_total_minor} / credits {p.credit_total_minor} (minor units)")
        if p.findings_from:
            lines.append(f"    findings from {p.findings_from}")
        lines.append(
            f"  approvals: {', '.join(view.approvals) or 'none'} ({len(view.approvals)}/{view.approvals_needed})"
            + (f", rejected by {view.rejected_by}" if view.rejected_by else "")
        )
    if view.verification:
        lines.append(f"  verification: {'PASSED' if view.verification.passed else 'FAILED'}")
        for c in view.verification.criteria:
            lines.append(f"    {'ok  ' if c.passed else 'FAIL'} {c.name}: {c.detail}")
            lines += [f"         left: {e.describe()}" for e in c.left]
    return "\n".join(lines)


def render_watch_status(view: Any) -> str:
    """`remediate watch status`: the schedule, the last tick, the lag, findings and what was started."""
    config = view.config
    lines = [
        f"drift watch {view.watch_id}: {'PAUSED' if view.paused else 'enabled'}"
        + (f" ({view.note})" if view.note else "")
    ]
    if config is not None:
        lines.append(
            f"  {config.scope.describe()}: changed keys every {config.every_seconds} s, full pass every"
            f" {config.full_every_seconds} s, settle {config.settle_seconds} s, acts from {config.act_threshold} finding(s)"
        )
    upcoming = ", ".join(t.strftime("%H:%M:%S") for t in view.next_runs)
    lines.append("  next ticks: " + ("none while paused" if view.paused else upcoming or "none"))
    if view.last_success_at is None:
        lines.append("  last successful tick: never")
    else:
        lines.append(
            f"  last successful tick: {view.last_success_at:%Y-%m-%d %H:%M:%S} UTC, {view.lag_seconds} s ago"
        )
    if view.failures_in_a_row:
        lines.append(
            f"  FAILING: the last {view.failures_in_a_row} tick(s) failed: {view.last_tick['error']}"
        )
    for tick in view.recent[:5]:
        found = {k: v for k, v in json.loads(tick["findings"] or "{}").items() if v}
        acted = json.loads(tick["acted"] or "[]")
        lines.append(
            f"  {tick['started_at']:%H:%M:%S} {tick['mode']:<11} {tick['outcome'] or 'running':<7}"
            f" events {tick['events_read']}, keys {tick['keys_checked']} checked / {tick['keys_deferred']} deferred,"
            f" found {found or 'nothing'}"
            + "".join(f"; {a['action']} {a.get('workflow_id') or a['scope']}" for a in acted)
        )
    return "\n".join(lines)


def _span(seconds: int | None) -> str:
    """``3 d 4 h`` / ``12 min 5 s`` / ``-``."""
    if seconds is None:
        return "-"
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{sign}{days} d {hours} h"
    if hours:
        return f"{sign}{hours} h {minutes} min"
    return f"{sign}{minutes} min {secs} s" if minutes else f"{sign}{secs} s"


def _utc(at: str) -> str:
    """An ISO timestamp as ``2026-11-30 12:15:43 UTC`` (seconds: what an auditor compares)."""
    try:
        return datetime.fromisoformat(at).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return at


SEVERITY = {"critical": 0, "unreachable": 1, "warn": 2, "ok": 3}


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "/").replace("\n", " ")


def render_evidence_markdown(doc: dict[str, Any]) -> str:
    """The evidence pack as markdown for tickets and finance."""
    run = doc["run"]
    out = [
        f"# Remediation evidence: {run['workflow_id']}",
        "",
        f"- Outcome: **{run['outcome']}** · blast radius: {run['blast_radius']} · trigger: {run['trigger']}",
        f"- Correlation id: `{run['correlation_id']}` · trace id: `{run['trace_id']}`",
        f"- Requested by: {run['requested_by']} · run id `{run['run_id']}`",
        *[
            f"- **Reversed by** {r['workflow_id']} ({r['outcome'] or 'running'}), requested by {r['requested_by']}:"
            f" {r['reason']}"
            for r in doc.get("reversed_by", [])
        ],
        "",
        "## Summary (internal: all customers together)",
        "",
        doc["customer_summary"],
        "",
        "## Customer-facing summaries (one per org, its own amounts)",
        "",
    ]
    for c in doc.get("customer_summaries", []):
        out += [f"### {c['org_id']} ({c['currency']})", "", c["summary"], ""]
    if not doc.get("customer_summaries"):
        out += ["- none", ""]
    if doc.get("reversal"):
        rev = doc["reversal"]
        out += ["## Reverses", "", f"- run `{rev['run_id']}` of {rev['workflow_id']}: {rev['reason']}", ""]
    if doc.get("balances"):
        out += ["## Balances (predicted when planned, actual after apply)", "",
                "| org / user | before | predicted | actual | |", "|---|---|---|---|---|"]  # fmt: skip
        out += [
            f"| {b['org_id']}{' / ' + b['user_id'] if b.get('user_id') else ''} | {format_money(b['before'], b['currency'])}"
            f" | {format_money(b['predicted'], b['currency'])}"
            f" | {format_money(b['actual'], b['currency'])} | {b['explained']} |"
            for b in doc["balances"]
        ]
        out.append("")
    out += ["## Impacted scope", ""]
    out += [
        f"- org {i['org_id']} ({i['currency']}): projects {', '.join(i['projects']) or '-'}; users "
        f"{', '.join(i['users']) or '-'}; {i['findings']} findings"
        for i in doc["impacted"]
    ] or ["- none"]
    durations = doc.get("durations") or {}
    out += ["", "## Incident timeline", ""]
    out.append(
        " · ".join(
            f"{label}: {_span(durations.get(key))}"
            for key, label in (
                ("time_to_detect_s", "time to detect"),
                ("time_to_approve_s", "to approve"),
                ("time_to_mitigate_s", "to mitigate"),
                ("time_to_recover_s", "to recover"),
            )
        )
    )
    out += ["", "| at (UTC) | source | event |", "|---|---|---|"]
    out += [f"| {_utc(t['at'])} | {t['source']} | {t['event']} |" for t in doc.get("incident_timeline", [])]
    out += ["", "## Diagnosis", "", "| check | verdict | headline |", "|---|---|---|"]
    out += [
        f"| {name} | {check.get('status', '?')} | {_cell(str(check.get('headline', '-')))} |"
        for name, check in sorted(
            (doc.get("diagnosis") or {}).items(), key=lambda kv: (SEVERITY.get(kv[1].get("status"), 9), kv[0])
        )
    ] or ["| - | - | no diagnosis recorded |"]
    plan = doc.get("plan")
    if plan:
        out += [
            "",
            "## Plan",
            "",
            f"`{plan['plan_id']}` hash `{plan['plan_hash']}`: {plan['action_count']} actions,"
            f" debits {plan['debit_total_minor']}, credits {plan['credit_total_minor']} (minor units)",
        ]
        if plan.get("findings_from"):
            out += ["", f"Findings from {plan['findings_from']}."]
    if doc.get("payments"):
        out += ["", "## Payments checked with the provider", ""]
        out += [
            "| session | provider ref | verdict | action | outcome | why | webhook |",
            "|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {p['session_id']} | {p['provider_ref']} | {p['verdict']} | {p['action']} | {p['outcome']}"
            f" | {p['reason']} | {p['webhook']} |"
            for p in doc["payments"]
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
        for c in verification["criteria"]:
            out.append(f"- {'✅' if c['passed'] else '❌'} {c['name']}: {c['detail']}")
            out += [f"  - left: {LeftEntity(**e).describe()}" for e in c.get("left", [])]
    skipped = doc.get("skipped") or []
    if skipped:
        out += ["", "## Actions not applied, and why", ""]
        out += [
            f"- #{s['seq']} {s['kind']} {s['entity_type']} {s['entity_id']} (org {s['org_id']}):"
            f" {s['outcome']}: {s['reason']}"
            for s in skipped
        ]
    out += ["", "## Follow-up tasks", ""] + ([f"- [ ] {f}" for f in doc["follow_ups"]] or ["- none"])
    return "\n".join(out) + "\n"


def render_evidence_html(doc: dict[str, Any]) -> str:
    """The evidence pack as one self-contained HTML page, with drift by kind before/after as a chart."""
    body = markdown_to_html(render_evidence_markdown(doc))
    chart = drift_chart_svg(doc["query_evidence"])
    # The chart sits under the title.
    head, sep, rest = body.partition("</h1>")
    head, rest = (head + sep, rest) if sep else ("", body)
    title = escape(f"Remediation evidence: {doc['run']['workflow_id']}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body{{font:15px/1.5 system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#1d2330}}
table{{border-collapse:collapse;width:100%}}td,th{{border:1px solid #d0d5dd;padding:4px 8px;text-align:left}}
code{{background:#f2f4f7;padding:0 3px}}h1{{font-size:1.5em}}h2{{margin-top:1.6em;font-size:1.2em}}
</style></head><body>
{head}
<h2>Drift by kind, before and after</h2>
{chart}
{rest}
</body></html>
"""


def drift_chart_svg(query_evidence: dict[str, Any]) -> str:
    """An inline SVG bar chart of drift counts by kind (before in grey, after in green)."""
    before = (query_evidence.get("before") or {}).get("drift", {})
    after = (query_evidence.get("after") or {}).get("drift", {})
    kinds = sorted(set(before) | set(after))
    if not kinds:
        return "<p>No drift snapshots were captured.</p>"
    top = max([*before.values(), *after.values(), 1])
    rows = []
    for i, kind in enumerate(kinds):
        y = 10 + i * 44
        for j, (label, value, color) in enumerate(
            (("before", before.get(kind, 0), "#98a2b3"), ("after", after.get(kind, 0), "#12b76a"))
        ):
            width = int(420 * value / top)
            rows.append(
                f'<rect x="230" y="{y + j * 18}" width="{width}" height="16" fill="{color}"/>'
                f'<text x="{236 + width}" y="{y + j * 18 + 13}" font-size="12">{label}: {value}</text>'
            )
        rows.append(f'<text x="0" y="{y + 22}" font-size="13">{escape(kind)}</text>')
    height = 20 + len(kinds) * 44
    return (
        f'<svg role="img" aria-label="drift by kind before and after" width="760" height="{height}"'
        f' xmlns="http://www.w3.org/2000/svg">{"".join(rows)}</svg>'
    )


def markdown_to_html(text: str) -> str:
    """The small markdown subset the evidence uses (headings, lists, tables, bold, code), escaped."""
    out: list[str] = []
    in_list = in_table = False
    for line in text.splitlines():
        if in_list and not line.startswith("- "):
            out.append("</ul>")
            in_list = False
        if in_table and not line.startswith("|"):
            out.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{_inline(line[2:])}</li>")
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in cells) + "</tr>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    out += ["</ul>"] if in_list else []
    out += ["</table>"] if in_table else []
    return "\n".join(out)


def _inline(text: str) -> str:
    html = escape(text)
    html = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", html)
