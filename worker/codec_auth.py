"""Who may use the codec server, decided on every request.

Production: the Temporal UI forwards the signed-in user's access token (its codec setting
``pass_access_token``); the token is a JWT checked against the identity provider's JWKS (issuer,
audience, expiry, signature) and authorised by a group claim. Scripts and the ``temporal`` CLI may use a
static bearer token instead. Local development on loopback may run with no authentication at all; any
other bind address without authentication is refused before the server starts.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import jwt

from config import Settings

# Asymmetric algorithms only: a symmetric (HS*) or unsigned token must never verify against a public key.
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
JWKS_MIN_REFRESH_SECONDS = 30.0  # an unknown key id refetches the JWKS at most this often


class CodecConfigError(ValueError):
    """The codec server's settings cannot be served safely."""


class AuthError(Exception):
    """A request refused: HTTP status and the reason the caller reads."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: who, how, and whether it may encode."""

    subject: str
    via: Literal["jwt", "token", "none"]
    may_encode: bool


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_config(settings: Settings, host: str) -> list[str]:
    """Refuse unsafe settings (CodecConfigError); return warnings to print at start."""
    jwt_on = settings.codec_jwks_url is not None
    if jwt_on:
        missing = [
            name
            for name, value in (
                ("CODEC_JWT_ISSUER", settings.codec_jwt_issuer),
                ("CODEC_JWT_AUDIENCE", settings.codec_jwt_audience),
                ("CODEC_JWT_GROUP", settings.codec_jwt_group),
            )
            if not value
        ]
        if missing:
            raise CodecConfigError(f"CODEC_JWKS_URL is set but {', '.join(missing)} is not: set it")
    if jwt_on or settings.codec_token is not None:
        return []
    if not is_loopback(host):
        raise CodecConfigError(
            f"refusing to serve decrypted payloads on {host} without authentication: set CODEC_JWKS_URL "
            "(with CODEC_JWT_ISSUER, CODEC_JWT_AUDIENCE, CODEC_JWT_GROUP) or CODEC_TOKEN, or bind to 127.0.0.1"
        )
    return [f"codec server: NO authentication (local development; only reachable on loopback {host})"]


class JwksCache:
    """The identity provider's signing keys, fetched with httpx and cached for ``ttl`` seconds."""

    def __init__(self, url: str, http: httpx.AsyncClient, ttl: float) -> None:
        self._url = url
        self._http = http
        self._ttl = ttl
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._retry_at = float("-inf")  # after a failed fetch, no request waits on the IdP again before this

    async def key(self, kid: str | None) -> jwt.PyJWK:
        """The key for ``kid`` (the only key when the token names none)."""
        now = time.monotonic()
        stale = now - self._fetched_at > self._ttl
        unknown = kid not in self._keys and now - self._fetched_at > JWKS_MIN_REFRESH_SECONDS
        if (stale or unknown) and now >= self._retry_at:
            await self._refresh()
        elif not self._keys:
            raise self._unreachable("recently failed")
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        found = self._keys.get(kid or "")
        if found is None:
            raise AuthError(401, "token signed with a key the identity provider does not publish")
        return found

    async def _refresh(self) -> None:
        try:
            response = await self._http.get(self._url)
            response.raise_for_status()
            keys = jwt.PyJWKSet.from_dict(response.json()).keys
        except (httpx.HTTPError, ValueError, jwt.PyJWTError) as err:
            # One failed fetch per JWKS_MIN_REFRESH_SECONDS: requests meanwhile use the cached keys (or
            # get 503 at once) instead of each waiting for the IdP's timeout.
            self._retry_at = time.monotonic() + JWKS_MIN_REFRESH_SECONDS
            if self._keys:
                return
            raise self._unreachable(type(err).__name__) from None
        self._keys = {k.key_id or "": k for k in keys}
        self._fetched_at = time.monotonic()

    def _unreachable(self, why: str) -> AuthError:
        return AuthError(
            503, f"cannot verify tokens: the identity provider's JWKS at {self._url} is unreachable ({why})"
        )


class CodecAuth:
    """Authenticates and authorises one request from its Authorization header."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient | None = None) -> None:
        self._settings = settings
        self._token = settings.codec_token.get_secret_value() if settings.codec_token else None
        self._jwks = (
            JwksCache(
                settings.codec_jwks_url,
                http or httpx.AsyncClient(timeout=settings.http_timeout_seconds),
                settings.codec_jwks_cache_seconds,
            )
            if settings.codec_jwks_url
            else None
        )

    @property
    def required(self) -> bool:
        """False only for the loopback development server with no authentication configured."""
        return self._jwks is not None or self._token is not None

    async def caller(self, authorization: str | None) -> Caller:
        """Who is calling, or AuthError (401 not authenticated, 403 not allowed, 503 IdP unreachable)."""
        encode_on = self._settings.codec_encode == "on"
        if not self.required:
            return Caller("anonymous (loopback development)", "none", encode_on)
        scheme, _, credential = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise AuthError(401, "missing bearer token (Authorization: Bearer ...)")
        credential = credential.strip()
        if self._token is not None and hmac.compare_digest(credential.encode(), self._token.encode()):
            return Caller("static-token", "token", encode_on)
        if self._jwks is None:
            raise AuthError(401, "invalid bearer token")
        claims = await self._verify(self._jwks, credential)
        groups = _groups(claims.get(self._settings.codec_jwt_group_claim))
        if self._settings.codec_jwt_group not in groups:
            raise AuthError(403, f"not a member of {self._settings.codec_jwt_group}")
        encode_group = self._settings.codec_jwt_encode_group
        return Caller(
            str(claims["sub"]), "jwt", encode_on and encode_group is not None and encode_group in groups
        )

    async def _verify(self, jwks: JwksCache, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError(401, "bearer token is not a JWT") from None
        key = await jwks.key(header.get("kid"))
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=ALGORITHMS,
                audience=self._settings.codec_jwt_audience,
                issuer=self._settings.codec_jwt_issuer,
                options={"require": ["exp", "iss", "aud", "sub"]},
                leeway=30,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired") from None
        except jwt.InvalidIssuerError:
            raise AuthError(401, "token from another issuer") from None
        except jwt.InvalidAudienceError:
            raise AuthError(401, "token for another audience") from None
        except jwt.InvalidSignatureError:
            raise AuthError(401, "token signature does not verify") from None
        except jwt.MissingRequiredClaimError as err:
            raise AuthError(401, f"token lacks the {err.claim!r} claim") from None
        except jwt.PyJWTError as err:
            raise AuthError(401, f"invalid token ({type(err).__name__})") from None
        return claims


def _groups(value: object) -> set[str]:
    """A group claim as a set: a list, or a space/comma separated string."""
    if isinstance(value, list):
        return {str(v) for v in value}
    if isinstance(value, str):
        return {v for v in value.replace(",", " ").split() if v}
    return set()
