"""One mapping from HTTP outcomes to the project's errors, shared by the Loki, Tempo and billing API adapters."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from temporalio.exceptions import ApplicationError

from activities.errors import bad_input, dependency_down, not_found, unauthorized

RETRY_STATUSES = frozenset({429, 502, 503, 504})


async def send(
    client: httpx.AsyncClient, system: str, method: str, url: str, *, attempts: int = 3, **kwargs: Any
) -> httpx.Response:
    """Send a request, retrying 429/5xx and transport failures with backoff (Retry-After honoured).

    Quick in-place retries ride out a blip; what persists becomes a retryable DependencyDown naming
    ``system`` (the activity's own retry policy takes over from there).
    """
    for attempt in range(1, attempts + 1):
        try:
            response = await client.request(method, url, **kwargs)
        except httpx.TimeoutException as exc:
            if attempt == attempts:
                raise dependency_down(f"{system} timed out") from exc
        except httpx.HTTPError as exc:
            if attempt == attempts:
                raise dependency_down(f"{system} unreachable: {type(exc).__name__}") from exc
        else:
            if response.status_code not in RETRY_STATUSES or attempt == attempts:
                return response
            delay = _retry_after(response)
            if delay is not None:
                await asyncio.sleep(delay)
                continue
        await asyncio.sleep(0.2 * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (capped: the activity retry handles long waits)."""
    value = response.headers.get("Retry-After", "")
    return min(float(value), 5.0) if value.isdigit() else None


def raise_for(system: str, response: httpx.Response) -> None:
    """Map a non-2xx answer: 429/5xx retry; 401/403, 404 and other 4xx do not."""
    if response.is_success:
        return
    body = response.text.strip().splitlines()[0][:300] if response.text.strip() else ""
    status = response.status_code
    message = f"{system} answered HTTP {status}" + (f": {body}" if body else "")
    error: ApplicationError
    if status == 429 or status >= 500:
        error = dependency_down(message)
    elif status in (401, 403):
        error = unauthorized(message)
    elif status == 404:
        error = not_found(message)
    else:
        error = bad_input(message)
    raise error


def json_object(system: str, response: httpx.Response) -> dict[str, Any]:
    """The body as a JSON object, or a retryable error naming the garbage."""
    try:
        value = response.json()
    except ValueError as exc:
        raise dependency_down(f"{system} returned invalid JSON: {response.text[:80]!r}") from exc
    if not isinstance(value, dict):
        raise dependency_down(f"{system} returned JSON that is not an object")
    return value
