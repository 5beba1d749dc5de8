"""The project's activity errors. Driver errors are wrapped into these (``raise ... from``).

Hierarchy (each maps to an ``ApplicationError`` type the workflow's retry policy understands)::

    RemediationError                 retryable unless stated
    ├── BadInput        non-retryable: the request names something that does not exist or contradicts itself
    ├── NotFound        non-retryable: a plan, run or trace id that does not exist
    ├── Unauthorized    non-retryable: the admin API refused our credentials (retrying cannot help)
    └── DependencyDown  retryable: Postgres, NATS, Loki, Tempo or the admin API is unreachable or answered 5xx
"""

from __future__ import annotations

from temporalio.exceptions import ApplicationError


def bad_input(message: str) -> ApplicationError:
    """Non-retryable: the input is wrong."""
    return ApplicationError(message, type="BadInput", non_retryable=True)


def not_found(message: str) -> ApplicationError:
    """Non-retryable: the referenced entity does not exist."""
    return ApplicationError(message, type="NotFound", non_retryable=True)


def unauthorized(message: str) -> ApplicationError:
    """Non-retryable: credentials refused."""
    return ApplicationError(message, type="Unauthorized", non_retryable=True)


def dependency_down(message: str) -> ApplicationError:
    """Retryable: a dependency is unreachable or failing."""
    return ApplicationError(message, type="DependencyDown")


__all__ = ["bad_input", "dependency_down", "not_found", "unauthorized"]
