"""The client side of remediations: start or attach, approve and sign, decide, read.

Used by the CLI, the alert intake and the demo (``import remediation_client as operations``); it
imports no activity module. What it shares with the worker's activities lives in ``database/``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Loaded on first use: `remediate status` pays for the Temporal client, not for signing keys or NATS.
_WHERE = {
    "MIN_PREFIX": "approvals",
    "OperationError": "errors",
    "PlanRefused": "approvals",
    "Started": "runs",
    "WORKFLOW_ID": "handles",
    "abort": "runs",
    "approve_when_open": "approvals",
    "check_workflow_id": "handles",
    "customer_balances": "reads",
    "decide_plan": "approvals",
    "decide_verdict": "approvals",
    "evidence": "reads",
    "handle_for": "handles",
    "list_query": "reads",
    "list_runs": "reads",
    "plan": "reads",
    "plan_actions": "reads",
    "preflight": "runs",
    "resolve_plan_hash": "approvals",
    "reversal_request": "reversals",
    "reversals_of": "reversals",
    "reversed_by_words": "reversals",
    "start": "runs",
    "status": "reads",
    "submit_decision": "approvals",
    "verify_evidence": "integrity",
    "verify_launch_guard": "runs",
}

if TYPE_CHECKING:
    from remediation_client.approvals import (
        MIN_PREFIX,
        PlanRefused,
        approve_when_open,
        decide_plan,
        decide_verdict,
        resolve_plan_hash,
        submit_decision,
    )
    from remediation_client.errors import OperationError
    from remediation_client.handles import WORKFLOW_ID, check_workflow_id, handle_for
    from remediation_client.integrity import verify_evidence
    from remediation_client.reads import (
        customer_balances,
        evidence,
        list_query,
        list_runs,
        plan,
        plan_actions,
        status,
    )
    from remediation_client.reversals import reversal_request, reversals_of, reversed_by_words
    from remediation_client.runs import (
        Started,
        abort,
        preflight,
        start,
        verify_launch_guard,
    )


def __getattr__(name: str) -> Any:
    """The public name from its module, imported on first use."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'remediation_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"remediation_client.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "MIN_PREFIX",
    "WORKFLOW_ID",
    "OperationError",
    "PlanRefused",
    "Started",
    "abort",
    "approve_when_open",
    "check_workflow_id",
    "customer_balances",
    "decide_plan",
    "decide_verdict",
    "evidence",
    "handle_for",
    "list_query",
    "list_runs",
    "plan",
    "plan_actions",
    "preflight",
    "resolve_plan_hash",
    "reversal_request",
    "reversals_of",
    "reversed_by_words",
    "start",
    "status",
    "submit_decision",
    "verify_evidence",
    "verify_launch_guard",
]
