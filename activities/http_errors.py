"""One mapping from HTTP outcomes to the project's errors, shared by the Loki, Tempo and billing API adapters."""

from __future__ import annotations

from typing import Any

import httpx
from temporalio.exceptions import ApplicationError

from activities.errors import bad_input, dependency_down, not_found, unauthorized


async def send(
    client: httpx.AsyncClient, system: str, method: str, url: str, **kwargs: Any
) -> httpx.Response:
    """Send a request; transport failures become a retryable DependencyDown naming ``system``."""
    try:
        return await client.request(method, url, **kwargs)
    except httpx.TimeoutException as exc:
        raise dependency_down(f"{system} timed out") from exc
    except httpx.HTTPError as exc:
        raise dependency_down(f"{system} unreachable: {type(exc).__name__}") from exc


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
