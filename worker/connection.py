"""The Temporal client every process uses: pydantic payloads, encrypted unless turned off, traced."""

from __future__ import annotations

import asyncio

from temporalio.client import Client, Interceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import Runtime

from config import Settings
from worker.payload_codec import payload_keys, with_codec

CONNECT_ATTEMPTS = 20  # 0.5 s apart: rides out a server that is still starting


async def connect_temporal(
    settings: Settings, runtime: Runtime | None = None, *, traced: bool = True
) -> Client:
    """A Temporal client with the pydantic data converter and, unless turned off, payload encryption.

    ``runtime``: the worker's, exporting the SDK's metrics; other processes use the default one.
    ``traced``: with the tracing interceptor (workers always; a CLI command only when it exports spans).
    """
    for attempt in range(CONNECT_ATTEMPTS):
        try:
            return await _connect(settings, runtime, traced)
        except RuntimeError as err:
            # A dev server whose port is open may answer "Frontend is not healthy yet" for a moment.
            if "not healthy yet" not in str(err) or attempt == CONNECT_ATTEMPTS - 1:
                raise
            await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


async def _connect(settings: Settings, runtime: Runtime | None, traced: bool) -> Client:
    interceptors: list[Interceptor] = []
    if traced:
        from temporalio.contrib.opentelemetry import TracingInterceptor

        interceptors.append(TracingInterceptor())
    return await Client.connect(
        settings.resolved_temporal_address(),
        namespace=settings.temporal_namespace,
        data_converter=with_codec(pydantic_data_converter, payload_keys(settings)),
        # Spans for StartWorkflow/RunWorkflow/StartActivity/RunActivity; no-op unless tracing is configured.
        interceptors=interceptors,
        runtime=runtime,
    )
