"""`remediate dev up/down/status` with real binaries on free ports."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from config import Settings
from devstack import StackError, down, status, up
from devstack.processes import free_port, pid_alive


def test_up_twice_harmless_down_leaves_nothing(tmp_path: Path) -> None:
    settings = Settings(
        REMEDIATION_STATE_DIR=tmp_path,
        POSTGRES_PORT=free_port(),
        NATS_PORT=free_port(),
        TEMPORAL_PORT=free_port(),
        TEMPORAL_UI_PORT=free_port(),
    )
    try:
        first = up(settings)
        # Dev approvers get signing keys (private 0600) before anything starts.
        assert first[0].startswith("approver keys: made alice, bob, carol")
        assert ((tmp_path / "keys" / "alice.key").stat().st_mode & 0o777) == 0o600
        # ... and a payload-encryption key, since encryption is on by default.
        assert first[1].startswith("payload key: made")
        assert ((tmp_path / "payload.key").stat().st_mode & 0o777) == 0o600
        assert all("started" in line for line in first[2:])
        assert all(row.healthy for row in status(settings) if row.name in ("postgres", "nats", "temporal"))
        second = up(settings)
        assert all("already running" in line for line in second)
        pids = [int(p.read_text()) for p in (tmp_path / "pids").glob("*.pid")]
        assert len(pids) == 3
    finally:
        down(settings)
    assert not any(pid_alive(pid) for pid in pids)
    assert not any(row.healthy for row in status(settings) if row.name in ("postgres", "nats", "temporal"))


def test_taken_port_fails_with_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        settings = Settings(REMEDIATION_STATE_DIR=tmp_path, NATS_PORT=port)
        from devstack.stack import Nats

        with pytest.raises(StackError) as err:
            Nats(settings).start()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("nats: port") and "NATS_PORT" in message


def test_cli_bad_seed_input_exits_with_a_clear_message() -> None:
    from typer.testing import CliRunner

    from starters.cli import app

    result = CliRunner().invoke(app, ["platform", "seed", "--orgs", "0"])
    assert result.exit_code == 2
    assert "--orgs must be at least 1" in result.output
    result = CliRunner().invoke(app, ["platform", "seed", "--inject", "bogus=1"])
    assert result.exit_code == 2 and "unknown drift kind" in result.output
