"""Prometheus and Alertmanager from Debian's packages, and the alert intake, for the local stack.

Prometheus scrapes the stand-in, the worker (its own and the Temporal SDK's metrics) and the intake,
evaluates the shipped rules (alerting/rules/) and sends to Alertmanager, which routes the runbook's
alerts to `remediate alerts serve` with its bearer token (alerting/alertmanager.yml, as shipped).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path

from config import Settings
from devstack.component import Component, PythonService
from devstack.processes import StackError, spawn, wait_for_port

# The repository's shipped rules and routes (embedded/devstack/ -> the checkout's alerting/).
ALERTING = Path(__file__).resolve().parents[2] / "alerting"
RULES_DIR = ALERTING / "rules"
ALERTMANAGER_CONFIG = ALERTING / "alertmanager.yml"
# The embedded stack is for trying the loop: the shipped rules with `for` in seconds, evaluated every 2 s,
# and Alertmanager's group timings short, so an incident alerts, remediates and resolves in a minute.
# Production runs the rules as shipped on its own Prometheus (PROMETHEUS_URL / ALERTMANAGER_URL).
DEV_FOR = {"2m": "2s", "5m": "3s", "1m": "2s", "15m": "3s"}
DEV_INTERVAL = "2s"
DEV_TIMINGS = {"group_wait": "2s", "group_interval": "5s", "repeat_interval": "1m"}
INSTALL_HINT = "apt-get install -y prometheus prometheus-alertmanager (`make install` does it when it can)"


def debian_bin(name: str) -> str:
    """A binary of Debian's prometheus packages, or a one-line StackError saying how to install it."""
    found = shutil.which(name)
    if found is None:
        raise StackError(f"{name}: not installed; {INSTALL_HINT}")
    return found


def rules_with_short_for(target: Path, durations: dict[str, str] = DEV_FOR) -> Path:
    """A copy of the shipped rules in ``target`` whose `for:` durations are replaced (expressions unchanged)."""
    target.mkdir(parents=True, exist_ok=True)
    for rules in RULES_DIR.glob("*.yml"):
        text = re.sub(r"(?m)^(\s*for:) (\S+)$", lambda m: f"{m[1]} {durations[m[2]]}", rules.read_text())
        (target / rules.name).write_text(text)
    return target


def alertmanager_config(
    settings: Settings, token_file: Path, *, timings: dict[str, str] | None = None
) -> str:
    """The shipped Alertmanager configuration with the intake's address and token file filled in.

    ``timings`` overrides route timings (group_wait, group_interval, repeat_interval), e.g. for tests.
    """
    text = ALERTMANAGER_CONFIG.read_text()
    text = text.replace("${ALERTS_URL}", f"http://{settings.alerts_host}:{settings.alerts_port}")
    text = text.replace("${ALERTS_TOKEN_FILE}", str(token_file))
    # Pages go to the embedded approver inbox: plain SMTP on loopback, and its webhook endpoint.
    text = text.replace("${APPROVER_SMTP_SMARTHOST}", f"127.0.0.1:{settings.approver_inbox_smtp_port}")
    text = text.replace(
        "${APPROVER_WEBHOOK_URL}", f"http://127.0.0.1:{settings.approver_inbox_http_port}/pages"
    )
    text = text.replace("smtp_require_tls: true", "smtp_require_tls: false")
    for key, value in (timings or {}).items():
        text, found = re.subn(rf"(?m)^(\s*{key}:) \S+$", rf"\1 {value}", text)
        if not found:
            raise ValueError(f"{key}: not in {ALERTMANAGER_CONFIG}")
    return text


def prometheus_config(settings: Settings, rules_dir: Path, *, interval: str = "15s") -> str:
    """Scrape the stand-in, the worker, the Temporal SDK and the intake; evaluate ``rules_dir``'s rules."""
    host = settings.metrics_host
    jobs = {
        "billing-platform": f"127.0.0.1:{settings.platform_port}",
        "remediation-worker": f"{host}:{settings.worker_metrics_port}",
        "temporal-sdk": f"{host}:{settings.temporal_sdk_metrics_port}",
        "alert-intake": f"{settings.alerts_host}:{settings.alerts_port}",
    }
    alertmanager = settings.resolved_alertmanager_url().split("://", 1)[-1].rstrip("/")
    document = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rules_dir / "*.yml")],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]}
            for job, target in jobs.items()
            if not target.endswith(":0")
        ],
    }
    return json.dumps(document, indent=2)  # JSON is YAML: no YAML writer needed


def dev_tokens(settings: Settings) -> list[str]:
    """Make the local alert-intake and approval-page tokens (0600) unless they are configured."""
    made = []
    for what, configured, path in (
        ("alert intake token", settings.resolved_alerts_token(), settings.resolved_alerts_token_file()),
        (
            "approval page token",
            settings.resolved_approvals_token(),
            settings.resolved_approvals_token_file(),
        ),
    ):
        if configured is not None:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
        made.append(f"{what}: made {path}")
    return made


class Alertmanager(Component):
    """Alertmanager (Debian's prometheus-alertmanager) on loopback, clustering off."""

    name = "alertmanager"
    timings: dict[str, str] | None = DEV_TIMINGS

    @property
    def external(self) -> bool:
        return self.settings.alertmanager_url is not None

    @property
    def port(self) -> int:
        return self.settings.alertmanager_port

    @property
    def address(self) -> str:
        return self.settings.resolved_alertmanager_url()

    def _launch(self) -> None:
        home = self.state_dir / "alertmanager"
        home.mkdir(parents=True, exist_ok=True)
        config = home / "alertmanager.yml"
        config.write_text(
            # Absolute: Alertmanager resolves a relative credentials_file against its config's directory.
            alertmanager_config(
                self.settings, self.settings.resolved_alerts_token_file().resolve(), timings=self.timings
            )
        )
        pid = spawn(
            [
                debian_bin("prometheus-alertmanager"), f"--config.file={config}", f"--storage.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=",
            ],
            pid_file=self.pid_file,
            log_file=self.log_file,
        )  # fmt: skip
        wait_for_port(self.port, timeout=30, name=self.name, log_file=self.log_file, pid=pid)


class Prometheus(Component):
    """Prometheus (Debian's package) on loopback with the shipped rules."""

    name = "prometheus"
    rules_dir: Path | None = None  # None: the shipped rules with DEV_FOR
    interval = DEV_INTERVAL

    @property
    def external(self) -> bool:
        return self.settings.prometheus_url is not None

    @property
    def port(self) -> int:
        return self.settings.prometheus_port

    @property
    def address(self) -> str:
        return self.settings.resolved_prometheus_url()

    def _launch(self) -> None:
        home = self.state_dir / "prometheus"
        home.mkdir(parents=True, exist_ok=True)
        config = home / "prometheus.yml"
        rules = self.rules_dir or rules_with_short_for(home / "rules")
        config.write_text(prometheus_config(self.settings, rules, interval=self.interval))
        pid = spawn(
            [
                debian_bin("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle",
            ],
            pid_file=self.pid_file,
            log_file=self.log_file,
        )  # fmt: skip
        wait_for_port(self.port, timeout=60, name=self.name, log_file=self.log_file, pid=pid)


class ApprovalPage(PythonService):
    """`remediate approvals serve` on loopback: approvers review plans and sign in the browser."""

    name = "approval-page"

    @property
    def command(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("approvals", "serve")

    @property
    def port(self) -> int:
        return self.settings.approvals_port

    @property
    def address(self) -> str:
        return self.settings.approvals_url()

    def _port_env(self) -> str:
        return "APPROVALS_PORT"

    def _wait_ready(self, pid: int) -> None:
        wait_for_port(self.port, timeout=60, name=self.name, log_file=self.log_file, pid=pid)


class AlertIntake(PythonService):
    """`remediate alerts serve` on loopback: where Alertmanager sends the runbook's alerts."""

    name = "alert-intake"

    @property
    def command(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("alerts", "serve")

    @property
    def port(self) -> int:
        return self.settings.alerts_port

    def _port_env(self) -> str:
        return "ALERTS_PORT"

    def _wait_ready(self, pid: int) -> None:
        wait_for_port(self.port, timeout=60, name=self.name, log_file=self.log_file, pid=pid)
