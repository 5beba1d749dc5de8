"""A remediation's workflow handle from its id, refused early when malformed (what every read needs, nothing more)."""

from __future__ import annotations

import re
from typing import Any

from temporalio.client import Client, WorkflowHandle

from remediation_client.errors import OperationError

WORKFLOW_ID = re.compile(r"^remediation-[A-Za-z0-9._:/\-]{1,200}$")


def check_workflow_id(workflow_id: str) -> str:
    """Refuse malformed remediation ids before any call."""
    if not WORKFLOW_ID.fullmatch(workflow_id):
        raise OperationError(f"malformed remediation id {workflow_id!r}: expected 'remediation-<scope>'")
    return workflow_id


def handle_for(client: Client, workflow_id: str) -> WorkflowHandle[Any, Any]:
    """Handle of a remediation by id (validated)."""
    return client.get_workflow_handle(check_workflow_id(workflow_id))
