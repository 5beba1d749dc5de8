"""The workflow sandbox the worker and the replayer share."""

from __future__ import annotations

from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

# cryptography's Rust extension cannot be imported a second time inside the sandbox (the process
# aborts), and Ed25519 verification imports its backend lazily: pass the package through.
PASSTHROUGH = ("cryptography", "pydantic", "pydantic_core")


def workflow_runner() -> SandboxedWorkflowRunner:
    """The sandboxed runner with the project's pass-through modules."""
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
    )
