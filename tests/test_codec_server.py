"""The codec server decrypts only for who may read (issue 19): tests against the running server, with
signing keys from a JWKS this test serves over HTTP, as an identity provider would."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from temporalio.api.common.v1 import Payloads
from temporalio.contrib.pydantic import pydantic_data_converter

from config import Settings
from devstack.processes import free_port
from worker.codec_auth import CodecAuth, CodecConfigError, check_config
from worker.codec_server import codec_app
from worker.payload_codec import EncryptionCodec
from worker.telemetry import JsonFormatter

ISSUER = "https://idp.example/realms/billing"
AUDIENCE = "temporal-ui"
GROUP = "billing-readers"
UI = "http://127.0.0.1:8233"
SIGNING = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SECRET_AMOUNT = 987_654_321


def jwk_of(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**public, "kid": kid, "use": "sig", "alg": "RS256"}


def token(
    *,
    sub: str = "dana@example.com",
    groups: list[str] | None = None,
    iss: str = ISSUER,
    aud: str = AUDIENCE,
    exp_in: int = 300,
    key: rsa.RSAPrivateKey = SIGNING,
    kid: str = "k1",
) -> str:
    claims = {
        "sub": sub,
        "iss": iss,
        "aud": aud,
        "exp": int(time.time()) + exp_in,
        "groups": groups or [GROUP],
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """``app`` on a free loopback port until the block ends."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "server did not start"
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


class Idp:
    """A JWKS endpoint; ``up`` False makes it answer 503, as an unreachable provider would."""

    def __init__(self) -> None:
        self.up = True
        self.fetches = 0

    async def jwks(self, _: Request) -> JSONResponse:
        self.fetches += 1
        if not self.up:
            return JSONResponse({"error": "down"}, status_code=503)
        return JSONResponse({"keys": [jwk_of(SIGNING, "k1")]})


async def sealed_body(codec: EncryptionCodec) -> tuple[str, Any]:
    plain = pydantic_data_converter.payload_converter.to_payloads([{"amount_minor": SECRET_AMOUNT}])
    return json_format.MessageToJson(Payloads(payloads=await codec.encode(plain))), plain


def settings(jwks_url: str | None, **extra: Any) -> Settings:
    fields: dict[str, Any] = {"CODEC_NAMESPACES": "default"}
    if jwks_url:
        fields |= {
            "CODEC_JWKS_URL": jwks_url,
            "CODEC_JWT_ISSUER": ISSUER,
            "CODEC_JWT_AUDIENCE": AUDIENCE,
            "CODEC_JWT_GROUP": GROUP,
        }
    return Settings(**(fields | extra))


@contextlib.asynccontextmanager
async def codec_server(config: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, EncryptionCodec]]:
    codec = EncryptionCodec([os.urandom(32)])
    app = codec_app(
        codec,
        [UI],
        CodecAuth(config),
        namespaces=config.resolved_codec_namespaces(),
        max_body_bytes=config.codec_max_body_bytes,
    )
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        yield http, codec


def headers(bearer: str | None = None, namespace: str = "default") -> dict[str, str]:
    out = {"X-Namespace": namespace, "Origin": UI, "Content-Type": "application/json"}
    if bearer is not None:
        out["Authorization"] = f"Bearer {bearer}"
    return out


@pytest.mark.asyncio(loop_scope="session")
async def test_jwt_callers_are_authenticated_and_authorised(caplog: pytest.LogCaptureFixture) -> None:
    idp = Idp()
    async with serving(Starlette(routes=[Route("/jwks", idp.jwks)])) as idp_url:
        config = settings(f"{idp_url}/jwks", CODEC_ENCODE="on", CODEC_JWT_ENCODE_GROUP="billing-writers")
        async with codec_server(config) as (http, codec):
            body, plain = await sealed_body(codec)
            # CORS preflight needs no token (the browser sends none).
            preflight = await http.options(
                "/decode",
                headers={
                    "Origin": UI,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization,x-namespace,content-type",
                },
            )
            assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == UI
            refusals = {
                "no token": (headers(), 401, "missing bearer token"),
                "expired": (headers(token(exp_in=-600)), 401, "token expired"),
                "wrong issuer": (headers(token(iss="https://evil.example")), 401, "another issuer"),
                "wrong audience": (headers(token(aud="grafana")), 401, "another audience"),
                "bad signature": (headers(token(key=OTHER)), 401, "signature does not verify"),
                "unknown key": (headers(token(kid="k9")), 401, "does not publish"),
                "not a JWT": (headers("not-a-jwt"), 401, "not a JWT"),
                "no group": (headers(token(groups=["sales"])), 403, f"not a member of {GROUP}"),
                "wrong namespace": (headers(token(), namespace="payments"), 403, "'payments' is not served"),
            }
            for case, (sent, status, reason) in refusals.items():
                answer = await http.post("/decode", content=body, headers=sent)
                assert answer.status_code == status, case
                assert reason in answer.json()["error"], (case, answer.json())
                assert str(SECRET_AMOUNT) not in answer.text
            assert (await http.post("/decode", content=body, headers=headers())).headers[
                "www-authenticate"
            ] == "Bearer"
            with caplog.at_level(logging.INFO, logger="billing_remediation.codec"):
                answer = await http.post(
                    "/decode", content=body, headers=headers(token(sub="dana@example.com"))
                )
            assert answer.status_code == 200, answer.text
            assert list(json_format.Parse(answer.text, Payloads()).payloads) == list(plain)
            # The audit line names who read how many payloads of which namespace, and nothing of them.
            (line,) = [JsonFormatter().format(r) for r in caplog.records if r.getMessage() == "codec decode"]
            audit = json.loads(line)
            expected = {
                "subject": "dana@example.com",
                "auth": "jwt",
                "namespace": "default",
                "payloads": 1,
                "op": "decode",
            }
            assert {k: audit.get(k) for k in expected} == expected
            sealed = json.loads(body)["payloads"][0]["data"]
            assert str(SECRET_AMOUNT) not in line and sealed[:24] not in line
            assert base64.b64encode(plain[0].data).decode()[:16] not in line
            # /encode only for callers allowed to write.
            plain_body = json_format.MessageToJson(Payloads(payloads=plain))
            reader = await http.post("/encode", content=plain_body, headers=headers(token()))
            assert reader.status_code == 403 and "not allowed" in reader.json()["error"]
            writer = await http.post(
                "/encode", content=plain_body, headers=headers(token(groups=[GROUP, "billing-writers"]))
            )
            assert writer.status_code == 200
            # Oversized bodies are refused before they are read.
            huge = await http.post("/decode", content=b"x" * (5 * 1024 * 1024), headers=headers(token()))
            assert huge.status_code == 413
            # The JWKS is cached: the provider going down does not log everyone out at once.
            fetched = idp.fetches
            idp.up = False
            assert (await http.post("/decode", content=body, headers=headers(token()))).status_code == 200
            assert idp.fetches == fetched
        # Past the cache's lifetime with the provider down: still verified with the cached keys, and the
        # provider is asked once, not once per request (each ask could wait for its timeout).
        expiring = config.model_copy(update={"codec_jwks_cache_seconds": 0.2})
        idp.up = True
        async with codec_server(expiring) as (http, codec):
            body, _ = await sealed_body(codec)
            assert (await http.post("/decode", content=body, headers=headers(token()))).status_code == 200
            idp.up = False
            await asyncio.sleep(0.3)
            fetched = idp.fetches
            for _ in range(5):
                assert (await http.post("/decode", content=body, headers=headers(token()))).status_code == 200
            assert idp.fetches == fetched + 1
        # A provider that was never reachable: 503 with the reason, not a 401 that blames the user.
        async with codec_server(config) as (http, codec):
            body, _ = await sealed_body(codec)
            answer = await http.post("/decode", content=body, headers=headers(token()))
            assert answer.status_code == 503 and "JWKS" in answer.json()["error"]
            fetched = idp.fetches
            again = await http.post("/decode", content=body, headers=headers(token()))
            assert again.status_code == 503 and idp.fetches == fetched  # answered at once, no new fetch


@pytest.mark.asyncio(loop_scope="session")
async def test_static_token_and_encode_off_by_default() -> None:
    config = settings(None, CODEC_TOKEN="scripts-token-123")
    async with codec_server(config) as (http, codec):
        body, plain = await sealed_body(codec)
        assert (await http.post("/decode", content=body, headers=headers("wrong"))).status_code == 401
        answer = await http.post("/decode", content=body, headers=headers("scripts-token-123"))
        assert answer.status_code == 200
        assert list(json_format.Parse(answer.text, Payloads()).payloads) == list(plain)
        assert answer.headers["access-control-allow-origin"] == UI
        other = await http.post(
            "/decode", content=body, headers=headers("scripts-token-123") | {"Origin": "http://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers  # browsers elsewhere cannot read it
        bad = await http.post("/decode", content=b"{not json", headers=headers("scripts-token-123"))
        assert bad.status_code == 400 and "not JSON Payloads" in bad.json()["error"]
        plain_body = json_format.MessageToJson(Payloads(payloads=plain))
        refused = await http.post("/encode", content=plain_body, headers=headers("scripts-token-123"))
        assert refused.status_code == 403


def test_unsafe_configurations_are_refused_before_start(tmp_path: Path) -> None:
    with pytest.raises(CodecConfigError, match="without authentication"):
        check_config(settings(None), "0.0.0.0")
    with pytest.raises(CodecConfigError, match="CODEC_JWT_GROUP"):
        check_config(settings("http://idp/jwks", CODEC_JWT_GROUP=None), "0.0.0.0")
    assert check_config(settings(None, CODEC_TOKEN="t"), "0.0.0.0") == []
    assert "NO authentication" in check_config(settings(None), "127.0.0.1")[0]
    # The command itself refuses a non-loopback bind without authentication, in one line.
    env = {
        **os.environ,
        "REMEDIATION_STATE_DIR": str(tmp_path),
        "PAYLOAD_KEY": base64.b64encode(os.urandom(32)).decode(),
        "CODEC_HOST": "0.0.0.0",
    }
    env.pop("CODEC_TOKEN", None)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "remediate"), "codec-server"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "refusing to serve decrypted payloads on 0.0.0.0 without authentication" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
