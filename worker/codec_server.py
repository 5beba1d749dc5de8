"""A Temporal codec server: lets the Temporal UI (and `temporal` CLI) show encrypted payloads.

Implements the documented `/encode` and `/decode` endpoints (JSON-encoded `Payloads`), with CORS for
the UI's origin. Point the UI at it (`--ui-codec-endpoint` on the dev server, `TEMPORAL_CODEC_ENDPOINT`
for the UI container); it must run only where the people allowed to read billing data can reach it.
"""

from __future__ import annotations

from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.api.common.v1 import Payloads

from worker.payload_codec import EncryptionCodec, PayloadKeyError


def codec_app(codec: EncryptionCodec, ui_origins: list[str]) -> Starlette:
    """The ASGI app serving ``codec`` to the given UI origins."""

    async def transform(request: Request, decode: bool) -> Response:
        try:
            payloads = json_format.Parse(await request.body(), Payloads())
        except json_format.ParseError as err:
            return JSONResponse({"error": f"body is not JSON Payloads: {err}"}, status_code=400)
        try:
            out = await (codec.decode(payloads.payloads) if decode else codec.encode(payloads.payloads))
        except PayloadKeyError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        return Response(json_format.MessageToJson(Payloads(payloads=out)), media_type="application/json")

    async def decode(request: Request) -> Response:
        return await transform(request, decode=True)

    async def encode(request: Request) -> Response:
        return await transform(request, decode=False)

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
