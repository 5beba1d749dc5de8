"""Read and render the stand-in's /healthz (API and background loops) for `remediate platform status`."""

from __future__ import annotations

import time
from typing import Any

import httpx


class PlatformUnreachable(OSError):
    """The stand-in did not answer /healthz (an OSError: the CLI reports it as a dependency down)."""


async def fetch_health(base_url: str, timeout: float) -> tuple[int, dict[str, Any]]:
    """GET /healthz: its status code and body."""
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as http:
            response = await http.get("/healthz")
        return response.status_code, response.json()
    except (httpx.HTTPError, ValueError) as err:
        raise PlatformUnreachable(
            f"platform stand-in at {base_url}: no health answer ({type(err).__name__})"
        ) from None


def render_health(body: dict[str, Any], now: float | None = None) -> str:
    """One line for the API, one per loop: state, restarts, last progress and last error."""
    now = time.time() if now is None else now
    lines = [f"platform: {'ok' if body.get('ok') else 'FAILING'}"]
    mode = body.get("worker_mode")
    if mode != "running":
        # The loops can be alive while the worker consumes nothing (a crashed or stalled incident).
        lines.append(f"  billing worker control mode: {mode or 'unknown (database unreachable)'}")
    for name, loop in sorted(body.get("loops", {}).items()):
        seen = loop.get("last_progress_at")
        progress = f"last progress {now - seen:.1f}s ago" if seen else "no progress yet"
        line = f"  {name:<15} {loop['state']:<10} restarts {loop['restarts']:<3} {progress}"
        if loop.get("last_error"):
            line += f"; last error: {loop['last_error']}"
        lines.append(line)
    return "\n".join(lines)
