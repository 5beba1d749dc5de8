"""AES-256-GCM payload encryption: billing data in workflow history is unreadable without the key.

The first key encrypts; every configured key decrypts (by key id), so a key can be rotated by
prepending the new one and dropping the old one once no open workflow history still needs it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
from collections.abc import Iterable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import DataConverter, PayloadCodec

from config import Settings

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"


class PayloadKeyError(ValueError):
    """The payload key is missing or malformed; the message says which setting to fix."""


def key_id(key: bytes) -> str:
    """A short, non-secret id for ``key`` (stored next to each encrypted payload)."""
    return hashlib.sha256(key).hexdigest()[:12]


def parse_keys(text: str, source: str) -> list[bytes]:
    """Base64 keys, one per line, newest first; each must be 32 bytes."""
    keys = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            key = base64.b64decode(line.strip(), validate=True)
        except binascii.Error:
            raise PayloadKeyError(f"{source} line {n}: not base64") from None
        if len(key) != 32:
            raise PayloadKeyError(f"{source} line {n}: an AES-256 key is 32 bytes, got {len(key)}")
        keys.append(key)
    if not keys:
        raise PayloadKeyError(f"{source}: no key")
    return keys


def payload_keys(settings: Settings) -> list[bytes] | None:
    """The configured payload keys, None when encryption is off; a clear error when a key is missing."""
    if settings.payload_encryption == "off":
        return None
    if settings.payload_key is not None:
        return parse_keys(settings.payload_key.get_secret_value(), "PAYLOAD_KEY")
    path = settings.resolved_payload_key_file()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PayloadKeyError(
            f"PAYLOAD_ENCRYPTION is on but there is no key at {path}: set PAYLOAD_KEY or PAYLOAD_KEY_FILE "
            "(`remediate dev up` makes one locally), or PAYLOAD_ENCRYPTION=off"
        ) from None
    return parse_keys(text, str(path))


def new_key_text() -> str:
    """A fresh random key in the file format."""
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode() + "\n"


class EncryptionCodec(PayloadCodec):
    """Encrypts every payload with the newest key; decrypts with whichever key id a payload names."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise PayloadKeyError("no payload key")
        self._current = key_id(keys[0])
        self._ciphers = {key_id(k): AESGCM(k) for k in keys}

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Encrypt each payload (metadata included) into an opaque one."""
        cipher = self._ciphers[self._current]
        out = []
        for payload in payloads:
            nonce = os.urandom(12)
            data = nonce + cipher.encrypt(nonce, payload.SerializeToString(), None)
            out.append(Payload(metadata={"encoding": ENCODING, KEY_ID: self._current.encode()}, data=data))
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Decrypt encrypted payloads; leave plain ones (from before encryption was on) as they are."""
        return [self._decode_one(p) for p in payloads]

    def _decode_one(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload
        kid = payload.metadata.get(KEY_ID, b"").decode()
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise PayloadKeyError(f"payload was encrypted with key {kid!r}, which is not configured")
        try:
            plain = cipher.decrypt(payload.data[:12], payload.data[12:], None)
        except InvalidTag:
            raise PayloadKeyError(
                f"payload under key {kid!r} failed authentication (tampered or corrupt)"
            ) from None
        return Payload.FromString(plain)


def with_codec(converter: DataConverter, keys: Iterable[bytes] | None) -> DataConverter:
    """``converter`` with payload encryption when keys are given."""
    key_list = list(keys or [])
    if not key_list:
        return converter
    return dataclasses.replace(converter, payload_codec=EncryptionCodec(key_list))
