"""A Temporal codec server: lets the Temporal UI (and `temporal` CLI) show encrypted payloads.

Implements the documented `/encode` and `/decode` endpoints (JSON-encoded `Payloads`), with CORS for
the UI's origin. Every request but a CORS preflight is authenticated (`worker.codec_auth`), checked
against the namespaces this server serves, and each decode is audited as one JSON log line naming the
caller and counting payloads, never showing them. `/encode` (forging payloads under the real key) is off
unless `CODEC_ENCODE=on`, and then only for callers allowed to write.
"""

from __future__ import annotations

import logging
from typing import Literal

from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.api.common.v1 import Payloads

from worker.codec_auth import AuthError, Caller, CodecAuth
from worker.payload_codec import EncryptionCodec, PayloadKeyError

audit = logging.getLogger("billing_remediation.codec")


class BodyTooLarge(Exception):
    """The request body exceeds the configured limit."""


async def _read_capped(request: Request, limit: int) -> bytes:
    """The body, refused before it is read when declared too large, and cut off when it grows past the limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def codec_app(
    codec: EncryptionCodec,
    ui_origins: list[str],
    auth: CodecAuth,
    *,
    namespaces: list[str],
    max_body_bytes: int = 4 * 1024 * 1024,
) -> Starlette:
    """The ASGI app serving ``codec`` to authenticated callers of ``namespaces`` from the UI's origins."""

    async def transform(request: Request, op: Literal["decode", "encode"]) -> Response:
        namespace = request.headers.get("x-namespace", "")
        try:
            caller: Caller = await auth.caller(request.headers.get("authorization"))
            if namespace not in namespaces:
                raise AuthError(403, f"namespace {namespace[:64]!r} is not served here (X-Namespace)")
            if op == "encode" and not caller.may_encode:
                raise AuthError(403, "encoding is not allowed for this caller (CODEC_ENCODE)")
        except AuthError as err:
            audit.warning(
                "codec %s refused: %s",
                op,
                err.reason,
                extra={"fields": {"op": op, "namespace": namespace[:64], "status": err.status}},
            )
            headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
            return JSONResponse({"error": err.reason}, status_code=err.status, headers=headers)
        try:
            body = await _read_capped(request, max_body_bytes)
        except BodyTooLarge:
            return JSONResponse({"error": f"body over the limit of {max_body_bytes} bytes"}, status_code=413)
        try:
            payloads = json_format.Parse(body, Payloads())
        except json_format.ParseError as err:
            return JSONResponse({"error": f"body is not JSON Payloads: {err}"}, status_code=400)
        try:
            out = await (
                codec.decode(payloads.payloads) if op == "decode" else codec.encode(payloads.payloads)
            )
        except PayloadKeyError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        # Who read how much of which namespace; never the payloads.
        audit.info(
            "codec %s",
            op,
            extra={
                "fields": {
                    "op": op,
                    "subject": caller.subject,
                    "auth": caller.via,
                    "namespace": namespace,
                    "payloads": len(out),
                }
            },
        )
        return Response(json_format.MessageToJson(Payloads(payloads=out)), media_type="application/json")

    async def decode(request: Request) -> Response:
        return await transform(request, "decode")

    async def encode(request: Request) -> Response:
        return await transform(request, "encode")

    return Starlette(
        routes=[Route("/decode", decode, methods=["POST"]), Route("/encode", encode, methods=["POST"])],
        middleware=[
            Middleware(
                CORSMiddleware,
                allow_origins=ui_origins,
                allow_methods=["POST"],
                allow_headers=["content-type", "x-namespace", "authorization"],
                allow_credentials=True,
            )
        ],
    )
