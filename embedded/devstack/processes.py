"""Background processes tracked by pid files, and loopback port checks."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path


class StackError(RuntimeError):
    """A component could not be started or stopped; the message is one line naming the fix."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_accepts(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True when a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# Below the kernel's ephemeral range (32768+): a port the OS hands out for bind(0) can be taken by
# any outgoing connection before the server that was meant to listen on it starts.
_TEST_PORTS = range(20000, 32000)
_handed_out: set[int] = set()


def free_port() -> int:
    """A currently free loopback port below the ephemeral range, never the same twice per process."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(1000):
        port = rng.choice(_TEST_PORTS)
        if port not in _handed_out and port_is_free(port):
            _handed_out.add(port)
            return port
    raise StackError(f"no free loopback port in {_TEST_PORTS.start}-{_TEST_PORTS.stop - 1}")


def pid_alive(pid: int) -> bool:
    """True when a process with ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def read_pid(pid_file: Path) -> int | None:
    """The pid recorded in ``pid_file`` when that process still runs, else None."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid_alive(pid) else None


def spawn(args: list[str], *, pid_file: Path, log_file: Path, env: dict[str, str] | None = None) -> int:
    """Start ``args`` detached (own session), log to ``log_file``, record its pid."""
    log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    # Logs may name local paths and links: readable by their owner only, like the token files.
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "ab") as log:
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def stop_pid(pid: int, *, timeout: float = 15.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not pid_alive(pid):
                return
            time.sleep(0.1)


def wait_for_port(port: int, *, timeout: float, name: str, log_file: Path, pid: int | None = None) -> None:
    """Block until ``port`` accepts connections or raise a one-line StackError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_accepts(port):
            return
        if pid is not None and not pid_alive(pid):
            raise StackError(f"{name}: the process exited during start-up; see {log_file}")
        time.sleep(0.1)
    raise StackError(f"{name}: not listening on 127.0.0.1:{port} after {timeout:.0f}s; see {log_file}")
