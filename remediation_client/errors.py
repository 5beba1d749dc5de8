"""Errors a client reports to people: what went wrong, in one line."""

from __future__ import annotations

from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError


class OperationError(RuntimeError):
    """A command could not be carried out; the message says what is wrong."""


def update_refusal(err: WorkflowUpdateFailedError) -> str:
    """Why a workflow refused an Update: its validator's or handler's message."""
    return err.cause.message if isinstance(err.cause, ApplicationError) else str(err.cause)


def root_message(err: BaseException) -> str:
    """The innermost cause's message (an activity's or the workflow's own ApplicationError)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return getattr(err, "message", None) or str(err)
