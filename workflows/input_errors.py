"""Validation errors in words for people: what is allowed, and the offending value cut short.

A pydantic error names a regular expression and echoes the whole input; a commander at 3 a.m. (or an
Alertmanager log) needs the rule in words and at most the first characters of what was sent.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from contracts.models import ID_PATTERN, PLAN_HASH_PATTERN, TRACE_ID_PATTERN

ECHO_LIMIT = 64  # characters of a refused value shown back

RULES = {
    ID_PATTERN: "1–128 characters: letters, digits, . _ : - (starting with a letter or digit)",
    TRACE_ID_PATTERN: "1–32 hexadecimal characters",
    PLAN_HASH_PATTERN: "the 64 lowercase hexadecimal characters of a plan hash",
}


def shown(value: Any) -> str:
    """A refused value for an error message: quoted, cut to ECHO_LIMIT characters with its length."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= ECHO_LIMIT:
        return repr(text) if isinstance(value, str) else text
    return f"{text[:ECHO_LIMIT]!r}… ({len(text):,} characters)"


def explain(err: ValidationError, default_where: str = "request", *, echo: bool = True) -> str:
    """The first error as ``field: rule in words (got 'value')``."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or default_where
    pattern = (first.get("ctx") or {}).get("pattern")
    if first["type"] == "string_pattern_mismatch" and pattern in RULES:
        message = f"must be {RULES[pattern]}"
    else:
        message = first["msg"]
    if echo and "input" in first and not isinstance(first["input"], dict):
        return f"{where}: {message} (got {shown(first['input'])})"
    return f"{where}: {message}"
