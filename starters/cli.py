"""`remediate`: the incident commander's and approvers' command line (and the stack's)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback

# Importing the command modules registers their commands on the app.
from starters import incident_commands, reversal_commands, stack_commands, watch_commands
from starters.cli_app import app

__all__ = ["app", "incident_commands", "main", "reversal_commands", "stack_commands", "watch_commands"]


def main() -> None:
    """Console-script entry point: closes what the command opened, then exits with its code.

    Temporal's client runs Rust threads that cannot be closed from Python; left alive into interpreter
    finalization they sometimes abort a finished command with exit 134 (`PyGILState_Release: thread
    state ... must be current`, temporalio/sdk-python#300). So after the command's own clean-up the
    process ends without finalization.
    """
    code = 0
    try:
        app()
    except SystemExit as done:
        code = exit_code(done.code)
    except KeyboardInterrupt:  # Ctrl-C on a foreground service: the shell's convention, no traceback
        code = 130
    except BaseException:  # an unexpected crash still reports and exits through the same door
        traceback.print_exc()
        code = 1
    finally:
        close_process_resources()
    os._exit(code)


def exit_code(value: object) -> int:
    """The process exit code for a ``SystemExit`` value (None is success; text is printed, then 1)."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def close_process_resources() -> None:
    """Flush and shut down what outlives a command: span exporter, log handlers, standard streams."""
    # Only a command that connected set tracing up; importing it just to shut nothing down cost 0.3 s.
    telemetry = sys.modules.get("worker.telemetry")
    if telemetry is not None:
        telemetry.shutdown_tracing()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


if __name__ == "__main__":
    main()
