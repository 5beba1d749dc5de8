"""Loki `query_range` and Tempo trace-by-id endpoints over the stand-in's own logs and spans.

Answers in exactly the documented formats (see docs/external-apis.md): nanosecond timestamps as
strings, plain-text errors, base64 span ids, 404 with an empty body for a missing v1 trace.
"""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

MAX_ENTRIES = 5000
_TOKEN = re.compile(
    r"""\s*(?:(?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`)|(?P<op>\|=|!=|\|~|!~|=~|\||=|\{|\}|,)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*))"""
)


class LogQLError(ValueError):
    """A query outside the supported LogQL subset; rendered as Loki's plain-text parse error."""


@dataclass
class Matcher:
    label: str
    op: str
    value: str

    def matches(self, labels: dict[str, str]) -> bool:
        actual = labels.get(self.label, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        found = re.fullmatch(self.value, actual) is not None
        return found if self.op == "=~" else not found


@dataclass
class Query:
    selector: list[Matcher]
    line_filters: list[tuple[str, str]] = field(default_factory=list)
    json_stage: bool = False
    label_filters: list[Matcher] = field(default_factory=list)


def _unquote(token: str) -> str:
    if token.startswith("`"):
        return token[1:-1]
    return str(json.loads(token))


def parse_logql(text: str) -> Query:
    """Parse the subset of LogQL the adapters use: selector, line filters, `| json`, label filters."""
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise LogQLError(f"parse error at line 1, col {pos + 1}: syntax error: unexpected {text[pos]!r}")
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind), m.start(kind) + 1))
        pos = m.end()
    it = iter(tokens)

    def take() -> tuple[str, str, int]:
        try:
            return next(it)
        except StopIteration:
            raise LogQLError(
                f"parse error at line 1, col {len(text) + 1}: syntax error: unexpected end"
            ) from None

    def matcher(first: tuple[str, str, int]) -> Matcher:
        if first[0] != "ident":
            raise LogQLError(f"parse error at line 1, col {first[2]}: syntax error: expected label name")
        op = take()
        if op[1] not in ("=", "!=", "=~", "!~"):
            raise LogQLError(f"parse error at line 1, col {op[2]}: syntax error: unexpected {op[1]}")
        value = take()
        if value[0] != "str":
            raise LogQLError(f"parse error at line 1, col {value[2]}: syntax error: expected string")
        return Matcher(first[1], op[1], _unquote(value[1]))

    first = take()
    if first[1] != "{":
        raise LogQLError(
            f"parse error at line 1, col {first[2]}: syntax error: unexpected {first[1]}, expecting {{"
        )
    query = Query(selector=[])
    while True:
        tok = take()
        if tok[1] == "}":
            break
        if tok[1] == ",":
            continue
        query.selector.append(matcher(tok))
    if not query.selector:
        raise LogQLError("parse error : queries require at least one regexp or equality matcher")
    for tok in it:
        if tok[1] in ("|=", "!=", "|~", "!~"):
            value = take()
            if value[0] != "str":
                raise LogQLError(f"parse error at line 1, col {value[2]}: syntax error: expected string")
            query.line_filters.append((tok[1], _unquote(value[1])))
        elif tok[1] == "|":
            nxt = take()
            if nxt[1] == "json":
                query.json_stage = True
            else:
                query.label_filters.append(matcher(nxt))
        else:
            raise LogQLError(f"parse error at line 1, col {tok[2]}: syntax error: unexpected {tok[1]}")
    return query


def parse_time(value: str | None, default_ns: int) -> int:
    """Loki timestamps: <=10 digits seconds, longer nanoseconds, with '.' float seconds, else RFC3339."""
    if value is None or value == "":
        return default_ns
    if value.isdigit():
        return int(value) * 1_000_000_000 if len(value) <= 10 else int(value)
    try:
        return int(float(value) * 1_000_000_000)
    except ValueError:
        pass
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1_000_000_000)
    except ValueError as exc:
        raise LogQLError(
            f'invalid parameter "start/end": cannot parse "{value}" to a valid timestamp'
        ) from exc


def _text(status: int, message: str) -> PlainTextResponse:
    return PlainTextResponse(message + "\n", status_code=status)


def _tenant_ok(request: Request) -> bool:
    required: bool = request.app.state.require_tenant
    return not required or bool(request.headers.get("x-scope-orgid"))


async def loki_query_range(request: Request) -> Response:
    """GET /loki/api/v1/query_range"""
    if not _tenant_ok(request):
        return _text(401, "no org id")
    params = request.query_params
    try:
        query = parse_logql(params.get("query", ""))
        limit = int(params.get("limit", "100"))
        now = time.time_ns()
        end = parse_time(params.get("end"), now)
        start = parse_time(params.get("start"), end - 3600 * 1_000_000_000)
    except LogQLError as exc:
        return _text(400, str(exc))
    except ValueError:
        return _text(400, 'invalid parameter "limit"')
    if limit > MAX_ENTRIES:
        return _text(
            400,
            f"max entries limit per query exceeded, limit > max_entries_limit_per_query "
            f"({limit} > {MAX_ENTRIES})",
        )
    direction = params.get("direction", "backward")
    if direction not in ("forward", "backward"):
        return _text(400, f'invalid parameter "direction": {direction}')
    order = "ASC" if direction == "forward" else "DESC"
    categorize = "categorize-labels" in request.headers.get("x-loki-response-encoding-flags", "")
    rows = await request.app.state.pool.fetch(
        f"SELECT ts_ns, service, level, trace_id, line FROM platform_obs.logs WHERE ts_ns >= $1 AND ts_ns < $2"
        f" ORDER BY ts_ns {order}, id {order}",
        start,
        end,
    )
    streams: dict[tuple[tuple[str, str], ...], list[list[Any]]] = {}
    taken = 0
    for row in rows:
        indexed = {"service_name": row["service"], "service": row["service"], "level": row["level"]}
        if not all(m.matches(indexed) for m in query.selector):
            continue
        line: str = row["line"]
        if not _line_ok(line, query.line_filters):
            continue
        # A trace id kept out of the line is the entry's structured metadata.
        metadata = {"trace_id": row["trace_id"]} if row["trace_id"] and '"trace_id"' not in line else {}
        parsed: dict[str, str] = {}
        if query.json_stage:
            try:
                for key, value in json.loads(line).items():
                    if (
                        isinstance(value, str | int | float | bool)
                        and key not in indexed
                        and key not in metadata
                    ):
                        parsed[key] = str(value)
            except json.JSONDecodeError:
                parsed["__error__"] = "JSONParserErr"
        labels = {**indexed, **metadata, **parsed}
        labels.setdefault("__error__", "")
        if not all(m.matches(labels) for m in query.label_filters):
            continue
        if categorize:
            # Loki's categorize-labels encoding: stream = index labels; the rest per entry.
            key = tuple(sorted(indexed.items()))
            extra = {k: v for k, v in (("structuredMetadata", metadata), ("parsed", parsed)) if v}
            streams.setdefault(key, []).append([str(row["ts_ns"]), line, extra])
        else:
            if not labels["__error__"]:
                del labels["__error__"]
            key = tuple(sorted(labels.items()))
            streams.setdefault(key, []).append([str(row["ts_ns"]), line])
        taken += 1
        if taken >= limit:
            break
    result = [{"stream": dict(k), "values": v} for k, v in streams.items()]
    data: dict[str, Any] = {
        "resultType": "streams",
        "result": result,
        "stats": {"summary": {"totalEntriesReturned": taken}},
    }
    if categorize:
        data["encodingFlags"] = ["categorize-labels"]
    return JSONResponse({"status": "success", "data": data})


def _line_ok(line: str, filters: list[tuple[str, str]]) -> bool:
    for op, value in filters:
        if op == "|=" and value not in line:
            return False
        if op == "!=" and value in line:
            return False
        if op == "|~" and re.search(value, line) is None:
            return False
        if op == "!~" and re.search(value, line) is not None:
            return False
    return True


def _b64(hex_id: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_id)).decode()


def _validate_trace_id(raw: str) -> str | None:
    if not re.fullmatch(r"[0-9a-fA-F]+", raw):
        return (
            f"trace IDs can only contain hex characters: invalid character '{_first_bad(raw)}' at position 1"
        )
    if len(raw) > 32:
        return "trace IDs can't be larger than 128 bits"
    return None


def _first_bad(raw: str) -> str:
    return next((c for c in raw if c not in "0123456789abcdefABCDEF"), "?")


async def _resource_spans(request: Request, trace_id: str) -> list[dict[str, Any]]:
    rows = await request.app.state.pool.fetch(
        "SELECT * FROM platform_obs.spans WHERE trace_id = $1 ORDER BY start_ns",
        trace_id.lower().rjust(32, "0"),
    )
    by_service: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        span: dict[str, Any] = {
            "traceId": _b64(r["trace_id"]),
            "spanId": _b64(r["span_id"]),
            "name": r["name"],
            "kind": r["kind"],
            "startTimeUnixNano": str(r["start_ns"]),
            "endTimeUnixNano": str(r["end_ns"]),
            "attributes": [
                {"key": k, "value": {"stringValue": str(v)}} for k, v in json.loads(r["attributes"]).items()
            ],
            "status": (
                {"code": r["status_code"], "message": r["status_message"] or ""} if r["status_code"] else {}
            ),
        }
        if r["parent_span_id"]:
            span["parentSpanId"] = _b64(r["parent_span_id"])
        by_service.setdefault(r["service"], []).append(span)
    return [
        {
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": svc}}]},
            "scopeSpans": [{"scope": {"name": "gpuaas"}, "spans": spans}],
        }
        for svc, spans in by_service.items()
    ]


async def _trace_lookup(request: Request) -> list[dict[str, Any]] | Response:
    """Tenant and id checks shared by both trace endpoints, then the trace's resource spans."""
    if not _tenant_ok(request):
        return _text(401, "no org id")
    raw = request.path_params["trace_id"]
    problem = _validate_trace_id(raw)
    if problem:
        return _text(400, problem)
    return await _resource_spans(request, raw)


async def tempo_trace_v1(request: Request) -> Response:
    """GET /api/traces/{trace_id}: {"batches": [...]}, 404 with empty body when missing."""
    batches = await _trace_lookup(request)
    if isinstance(batches, Response):
        return batches
    if not batches:
        return Response(status_code=404)
    return JSONResponse({"batches": batches})


async def tempo_trace_v2(request: Request) -> Response:
    """GET /api/v2/traces/{trace_id}: {"trace": {"resourceSpans": [...]}}; 200 with an empty trace when missing."""
    resource_spans = await _trace_lookup(request)
    if isinstance(resource_spans, Response):
        return resource_spans
    trace: dict[str, Any] = {"resourceSpans": resource_spans} if resource_spans else {}
    return JSONResponse({"trace": trace, "metrics": {"inspectedBytes": "0"}})


ROUTES = [
    Route("/loki/api/v1/query_range", loki_query_range),
    Route("/api/traces/{trace_id}", tempo_trace_v1),
    Route("/api/v2/traces/{trace_id}", tempo_trace_v2),
]
