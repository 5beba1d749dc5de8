"""What the long-running commands share: an HTTP app served until its context exits, and SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator

import uvicorn
from starlette.types import ASGIApp


def stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (graceful shutdown of a `remediate ... serve` command)."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    return done


@contextlib.asynccontextmanager
async def serving(
    app: ASGIApp, name: str, *, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None
) -> AsyncIterator[None]:
    """Serve ``app`` (on ``host:port``, or an already bound ``sock``) from when it accepts until exit."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock] if sock is not None else None))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError(f"{name}: could not serve on {host}:{port}")
        await asyncio.sleep(0.05)
    try:
        yield
    finally:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
