"""Approver key pairs on disk: make one, find an approver's public key, sign a decision.

Private keys stay on the approver's machine (PEM, mode 0600); only public keys reach configuration
and, through it, the workflow.
"""

from __future__ import annotations

import base64
import os
import re
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contracts.models import ApprovalDecision
from contracts.signatures import signed_message

# Names become file names: no separators, no leading dot.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ApproverKeyError(Exception):
    """A key file is missing or unreadable; the message names the file."""


def public_key_b64(key: Ed25519PrivateKey) -> str:
    """The raw 32-byte public key, base64: the form APPROVERS and ``NAME.pub`` files hold."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def new_key_pair(keys_dir: Path, name: str, *, overwrite: bool = False) -> tuple[Path, str]:
    """Write ``NAME.key`` (private, 0600) and ``NAME.pub``; return the private path and public key."""
    if not NAME.fullmatch(name):
        raise ApproverKeyError(f"approver name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_path = keys_dir / f"{name}.key"
    if private_path.exists() and not overwrite:
        raise ApproverKeyError(f"{private_path} already exists (pass --overwrite to replace it)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public = public_key_b64(key)
    (keys_dir / f"{name}.pub").write_text(public + "\n")
    return private_path, public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an approver's private key, with an error naming the file when it is missing or wrong."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ApproverKeyError(
            f"no private key at {path} (make one with `remediate keys new NAME`)"
        ) from None
    except ValueError:
        raise ApproverKeyError(f"{path} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ApproverKeyError(f"{path} is not an Ed25519 key")
    return key


def read_public_key(keys_dir: Path, name: str) -> str | None:
    """The public key in ``keys_dir/NAME.pub``, if there is one."""
    path = keys_dir / f"{name}.pub"
    return path.read_text().strip() if path.is_file() else None


def sign(
    decision: ApprovalDecision, key: Ed25519PrivateKey, *, at: datetime | None = None
) -> ApprovalDecision:
    """``decision`` stamped with the signing time and signed over the canonical message."""
    stamped = decision.model_copy(update={"signed_at": (at or datetime.now(UTC)).isoformat()})
    signature = base64.b64encode(key.sign(signed_message(stamped))).decode()
    return stamped.model_copy(update={"signature": signature})
