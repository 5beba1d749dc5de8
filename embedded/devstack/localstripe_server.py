"""Run localstripe (a stateful Stripe API server written by others) on loopback, its store in our state dir.

localstripe's own entry point listens on every interface and pickles its whole store to
``/tmp/localstripe.pickle`` on every write (shared by every instance on the machine, quadratic in the
number of objects). This launcher serves the same application on 127.0.0.1 only, and persists the
store to the given file at most twice a second and on shutdown, so a restarted server still knows
every payment it answered for.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from localstripe import resources, server

PERSIST_EVERY_SECONDS = 0.5


def main() -> None:
    """`python -m devstack.localstripe_server --port N --store FILE`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--store", type=Path, required=True)
    args = parser.parse_args()
    store_file: Path = args.store
    store = resources.store
    if store_file.exists():
        with store_file.open("rb") as f:
            dict.update(store, pickle.load(f))  # noqa: S301 - our own file, written below
    dirty = asyncio.Event()

    def persist() -> None:
        tmp = store_file.with_suffix(".tmp")
        with tmp.open("wb") as f:
            pickle.dump(dict(store), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, store_file)  # atomic: a crash never leaves half a store

    def mark_dirty(*_: object) -> None:
        dirty.set()

    # Every write marks the store dirty; one task writes it out.
    resources.Store.dump_to_disk = mark_dirty

    async def persister(app: web.Application) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                await dirty.wait()
                dirty.clear()
                persist()
                await asyncio.sleep(PERSIST_EVERY_SECONDS)

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        persist()

    server.app.cleanup_ctx.append(persister)
    web.run_app(server.app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
