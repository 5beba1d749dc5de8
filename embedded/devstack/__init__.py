"""The embedded development stack: real Postgres, NATS JetStream and Temporal servers on loopback."""

from devstack.processes import StackError, free_port, port_is_free
from devstack.stack import ComponentStatus, down, status, up

__all__ = ["ComponentStatus", "StackError", "down", "free_port", "port_is_free", "status", "up"]
