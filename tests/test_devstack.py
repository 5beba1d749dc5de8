"""`remediate dev up/down/status` with real binaries on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sqlite3
import tempfile
from pathlib import Path

import asyncpg
import pytest

from config import Settings
from devstack import StackError, down, status, up
from devstack.processes import free_port, pid_alive
from devstack.stack import Postgres

SERVERS = (
    "postgres", "nats", "temporal", "payment-provider", "codec", "approver-inbox", "alertmanager", "prometheus",
)  # fmt: skip


def test_up_twice_harmless_down_leaves_nothing(tmp_path: Path) -> None:
    settings = Settings(
        REMEDIATION_STATE_DIR=tmp_path,
        POSTGRES_PORT=free_port(),
        NATS_PORT=free_port(),
        TEMPORAL_PORT=free_port(),
        TEMPORAL_UI_PORT=free_port(),
        CODEC_PORT=free_port(),
        PAYMENT_PROVIDER_PORT=free_port(),
        PAYMENT_PROVIDER_URL="",  # the session's provider is exported; this stack embeds its own
        ALERTMANAGER_PORT=free_port(),
        ALERTMANAGER_URL=None,  # likewise the session's Alertmanager
        PROMETHEUS_PORT=free_port(),
        APPROVER_INBOX_SMTP_PORT=free_port(),
        APPROVER_INBOX_HTTP_PORT=free_port(),
    )
    try:
        first = up(settings)
        # Dev approvers get signing keys (private 0600) before anything starts.
        assert first[0].startswith("approver keys: made alice, bob, carol")
        assert ((tmp_path / "keys" / "alice.key").stat().st_mode & 0o777) == 0o600
        # ... and a payload-encryption key, since encryption is on by default.
        assert first[1].startswith("payload key: made")
        assert ((tmp_path / "payload.key").stat().st_mode & 0o777) == 0o600
        # ... and the alert intake's bearer token, which Alertmanager reads from the same file.
        assert first[2].startswith("alert intake token: made")
        assert first[3].startswith("approval page token: made")
        for token in ("alerts.token", "approvals.token"):
            assert ((tmp_path / token).stat().st_mode & 0o777) == 0o600
        assert all("started" in line for line in first[4:])
        assert all(row.healthy for row in status(settings) if row.name in SERVERS)
        second = up(settings)
        assert all("already running" in line for line in second)
        pids = [int(p.read_text()) for p in (tmp_path / "pids").glob("*.pid")]
        # postgres, nats, temporal, the payment provider, the UI's codec server, the approver inbox,
        # Alertmanager, Prometheus
        assert len(pids) == 8
        config = (tmp_path / "alertmanager" / "alertmanager.yml").read_text()
        assert f"credentials_file: {tmp_path / 'alerts.token'}" in config
        # Approver pages go to the embedded inbox, in plain SMTP on loopback.
        assert f"smtp_smarthost: 127.0.0.1:{settings.approver_inbox_smtp_port}" in config
        assert "smtp_require_tls: false" in config
        # The dev server's SQLite file is in WAL mode (TEMPORAL_DEV_SQLITE_WAL): no disk sync per commit.
        (database,) = tmp_path.rglob("temporal.sqlite")
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        down(settings, purge=True)
    assert not any(pid_alive(pid) for pid in pids)
    assert not any(row.healthy for row in status(settings) if row.name in SERVERS)


@pytest.mark.skipif(os.geteuid() != 0, reason="the root path: Postgres runs as an unprivileged user")
def test_root_in_a_private_directory_runs_postgres_and_changes_no_permissions(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir()
    private.chmod(0o700)  # a container's /root, a `mktemp -d` workspace
    watched = [private, *private.parents]
    before = {p: p.stat().st_mode for p in watched}
    home = Path(tempfile.mkdtemp(prefix="br-pg-home-", dir="/tmp"))
    home.chmod(0o755)
    settings = Settings(
        REMEDIATION_STATE_DIR=private / "clone" / ".remediation",
        POSTGRES_PORT=free_port(),
        REMEDIATION_PG_HOME=home / "service",
    )
    pg = Postgres(settings)
    try:
        assert "started" in pg.start()
        assert asyncio.run(_select_one(settings.resolved_database_url())) == 1
        # Binaries and cluster live in the service home the stack created, not in the private tree.
        assert pg.data_dir.is_relative_to(home) and (pg.data_dir / "PG_VERSION").exists()
        assert (home / "service").stat().st_mode & 0o777 == 0o755
    finally:
        pg.stop()
        pg.purge()
    assert not pg.cluster_dir.exists()
    # A home the service user cannot reach is refused in one line that says what to do.
    unreachable = Settings(
        REMEDIATION_STATE_DIR=private / "clone" / ".remediation",
        POSTGRES_PORT=free_port(),
        REMEDIATION_PG_HOME=private / "pg-home",
    )
    with pytest.raises(StackError) as err:
        Postgres(unreachable).start()
    assert "\n" not in str(err.value) and "set REMEDIATION_PG_HOME" in str(err.value)
    assert not (private / "pg-home").exists()  # refused before anything was created
    assert {p: p.stat().st_mode for p in watched} == before
    shutil.rmtree(home)


async def _select_one(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT 1"))
    finally:
        await conn.close()


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
