"""Scope → SQL predicates (parameterised; identifiers never interpolated from input)."""

from __future__ import annotations

from contracts.models import Scope

ALLOCATION_COLUMNS = {
    "org_id": "a.org_id",
    "project_id": "a.project_id",
    "user_id": "a.requested_by_user_id",
    "allocation_id": "a.id",
    "app_instance_id": "a.app_instance_id",
    "usage_source": "a.usage_source",
    "control_plane_component": "a.control_plane_component",
}
USAGE_COLUMNS = {
    "org_id": "u.org_id",
    "project_id": "u.project_id",
    "user_id": "u.requested_by_user_id",
    "allocation_id": "u.allocation_id",
    "app_instance_id": "u.app_instance_id",
    "usage_source": "u.usage_source",
    "control_plane_component": "u.control_plane_component",
}
PAYMENT_COLUMNS = {"org_id": "p.org_id", "user_id": "p.user_id"}
LEDGER_COLUMNS = {"org_id": "l.org_id", "user_id": "l.requested_by_user_id"}


def columns_as(columns: dict[str, str], alias: str) -> dict[str, str]:
    """The same column map under another table alias (``a.org_id`` → ``c.org_id``)."""
    return {field: f"{alias}.{column.split('.', 1)[1]}" for field, column in columns.items()}


def scope_predicate(scope: Scope, columns: dict[str, str], first_param: int) -> tuple[str, list[str]]:
    """``AND``-joined predicate for ``scope`` over ``columns`` with params numbered from ``first_param``.

    A scope field the table cannot be filtered by (e.g. an allocation for payments) yields ``false``:
    that table is outside the scope.
    """
    clauses: list[str] = []
    params: list[str] = []
    for field, value in scope.model_dump().items():
        if not value:
            continue
        column = columns.get(field)
        if column is None:
            return "false", []
        params.append(value)
        clauses.append(f"{column} = ${first_param + len(params) - 1}")
    return (" AND ".join(clauses) or "true"), params


def scope_prefilter(scope: Scope, columns: dict[str, str], first_param: int) -> str | None:
    """A cheap *superset* filter: the scope's fields that ``columns`` has, numbered as in ``scope_predicate``.

    None when the table has none of them. Only for narrowing one side of an EXCEPT whose result is then
    checked exactly, so dropping a field can cost time but never correctness.
    """
    clauses = []
    number = first_param
    for field, value in scope.model_dump().items():
        if not value:
            continue
        if field in columns:
            clauses.append(f"{columns[field]} = ${number}")
        number += 1
    return " AND ".join(clauses) or None
