"""Scope validation against the billing data: refused before anything starts, naming the field."""

from __future__ import annotations

import asyncpg

from contracts.models import Scope


class ScopeRefused(ValueError):
    """The scope names an unknown entity or contradicts itself (the message names the field)."""


async def validate_scope(conn: asyncpg.Connection | asyncpg.Pool, scope: Scope) -> None:
    """Refuse scopes naming unknown entities or contradicting each other (ScopeRefused names the field)."""
    lookups = (
        ("org_id", "SELECT id, id AS org_id FROM billing.orgs WHERE id = $1"),
        ("project_id", "SELECT id, org_id FROM billing.projects WHERE id = $1"),
        ("user_id", "SELECT id, org_id FROM billing.users WHERE id = $1"),
        (
            "allocation_id",
            "SELECT id, org_id, project_id, requested_by_user_id FROM billing.allocations WHERE id = $1",
        ),
    )
    for field, sql in lookups:
        value = getattr(scope, field)
        if value is None:
            continue
        row = await conn.fetchrow(sql, value)
        if row is None:
            raise ScopeRefused(f"scope.{field}: unknown {field.removesuffix('_id')} {value!r}")
        if scope.org_id and row["org_id"] != scope.org_id:
            raise ScopeRefused(
                f"scope.{field}: {value!r} belongs to org {row['org_id']!r}, not {scope.org_id!r}"
            )
        if field == "allocation_id":
            if scope.project_id and row["project_id"] != scope.project_id:
                raise ScopeRefused(f"scope.allocation_id: {value!r} is outside project {scope.project_id!r}")
            if scope.user_id and row["requested_by_user_id"] != scope.user_id:
                raise ScopeRefused(
                    f"scope.allocation_id: {value!r} was not requested by user {scope.user_id!r}"
                )
