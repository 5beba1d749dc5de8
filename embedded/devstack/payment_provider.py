"""The payment provider: localstripe on loopback unless PAYMENT_PROVIDER_URL points at a real one."""

from __future__ import annotations

import sys

from devstack.component import Component
from devstack.processes import spawn, wait_for_port


class PaymentProvider(Component):
    """localstripe (PyPI), served by ``devstack.localstripe_server`` with its store in the state dir."""

    name = "payment-provider"

    @property
    def external(self) -> bool:
        return self.settings.payment_provider_url is not None

    @property
    def port(self) -> int:
        return self.settings.payment_provider_port

    @property
    def address(self) -> str:
        return self.settings.resolved_payment_provider_url()

    def _port_env(self) -> str:
        return "PAYMENT_PROVIDER_PORT"

    def _launch(self) -> None:
        store = self.state_dir / "payment-provider"
        store.mkdir(parents=True, exist_ok=True)
        pid = spawn(
            [
                sys.executable, "-m", "devstack.localstripe_server",
                "--port", str(self.port), "--store", str(store / "store.pickle"),
            ],
            pid_file=self.pid_file,
            log_file=self.log_file,
        )  # fmt: skip
        wait_for_port(self.port, timeout=60, name=self.name, log_file=self.log_file, pid=pid)
