"""The drift watch's reading of the platform's events since its watermark.

The watermark is the stream sequence up to which the events' keys are stored in Postgres, kept in
`remediation.watch_state` and advanced in the transaction that stores those keys: it never passes an
event whose keys are not stored, and a tick that fails reads the same events again. Each tick reads
from there with an ordered (ephemeral, flow-controlled push) consumer: about four times cheaper per
event than pulling from a durable consumer, and nothing is left on the server between ticks. The
billing worker's consumer says which keys it has not processed yet (still in flight).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import asyncpg
from nats.errors import Error as NatsError
from nats.js.errors import NotFoundError
from temporalio import activity

from activities.errors import dependency_down
from activities.nats_jetstream import NatsActivities
from contracts import names
from contracts.models import RunRef
from contracts.watch import CatchUp, CollectResult, TickRef, WorkerProgress

# What changes billing: provisioning (the worker's input), billing's own events, payments.
WATCH_SUBJECTS = ("provisioning.", "billing.", "payments.")
WORKER_SUBJECTS = "provisioning."  # the billing worker consumes these
MAX_EVENTS = 50_000  # per tick; the rest waits for the next (the watermark says where)
READ_TIMEOUT = 60.0  # seconds for one tick's events to arrive
CATCH_UP_CALLS = 10  # a remediation brings a watch at most this many reads behind up to now

# (kind, key) -> newest stream seq naming it, newest of those the worker consumes, newest event time
Keys = dict[tuple[str, str], tuple[int, int, datetime]]


def keys_of(data: dict[str, Any]) -> list[tuple[str, str]]:
    """The (kind, key) pairs an event names."""
    keys = []
    if isinstance(data.get("allocation_id"), str):
        keys.append(("allocation", data["allocation_id"]))
    if isinstance(data.get("payment_session_id"), str):
        keys.append(("payment_session", data["payment_session_id"]))
    return keys


def note(keys: Keys, subject: str, body: bytes, seq: int, at: datetime) -> None:
    """Record the keys one event names (a watched subject only)."""
    if not subject.startswith(WATCH_SUBJECTS):
        return
    consumed = seq if subject.startswith(WORKER_SUBJECTS) else 0
    try:
        data = json.loads(body)
    except ValueError:
        return
    for key in keys_of(data if isinstance(data, dict) else {}):
        old = keys.get(key)
        if old is None:
            keys[key] = (seq, consumed, at)
        elif seq > old[0]:
            keys[key] = (seq, max(consumed, old[1]), at)


class WatchEventActivities(NatsActivities):
    """Reads the platform's stream for the watch; shares the worker's lazily (re)connected client."""

    def __init__(self, url: str, stream: str, worker_consumer: str, pool: asyncpg.Pool) -> None:
        super().__init__(url, stream, worker_consumer, 0)
        self._pool = pool

    @activity.defn(name=names.WATCH_COLLECT_EVENTS)
    async def collect_changed_keys(self, tick: TickRef) -> CollectResult:
        """Read the events after the watermark (up to MAX_EVENTS); store their keys and the new watermark."""
        js = (await self._client()).jetstream()
        watermark = await self._pool.fetchval(
            "SELECT watermark_seq FROM remediation.watch_state WHERE watch_id = $1", tick.watch_id
        )
        keys: Keys = {}
        try:
            state = (await js.stream_info(self._stream)).state
            last = state.last_seq or 0
            # A watermark past the stream's end names another stream's events: it was recreated or
            # restored and its sequences started again. Read all it holds; the next pass is full (what
            # changed in between may be gone).
            reset = watermark is not None and watermark > last
            if reset:
                activity.logger.warning(
                    "stream %s ends at %d, before the watch's watermark %d: recreated or restored;"
                    " reading it from its start, the next pass is full",
                    self._stream,
                    last,
                    watermark,
                )
                watermark = 0
            # Events the stream no longer holds (its limits removed them) cannot be read: start after them.
            first = max((watermark or 0) + 1, state.first_seq or 0)
            if watermark is None or not state.messages or first > last:
                # The watch's first read (what came before is its full pass's), or nothing to read.
                end, read = max(last, watermark or 0), 0
            else:
                end, read = await self._read(js, first, min(last, first + MAX_EVENTS - 1), keys)
            stored = await self._store(tick, keys, end, reset=reset)
            worker = await self._worker_progress(js)
        except (NatsError, TimeoutError) as exc:
            raise dependency_down(f"NATS: reading the watch's events failed: {type(exc).__name__}") from exc
        return CollectResult(events_read=read, keys_stored=len(keys), watermark_seq=stored, worker=worker)

    @activity.defn(name=names.WATCH_CATCH_UP)
    async def catch_up(self, ref: RunRef) -> CatchUp:
        """Bring every platform-wide watch up to the stream's end (a remediation about to plan from it):
        the keys of events since its watermark are stored, as its next tick would."""
        watches = [
            r["watch_id"]
            for r in await self._pool.fetch(
                "SELECT watch_id FROM remediation.watch_state WHERE scope = '{}'::jsonb ORDER BY watch_id"
            )
        ]
        if not watches:
            return CatchUp()
        try:
            end = (await (await self._client()).jetstream().stream_info(self._stream)).state.last_seq or 0
        except (NatsError, TimeoutError) as exc:
            raise dependency_down(f"NATS: the stream's end is unknown: {type(exc).__name__}") from exc
        read = 0
        for watch_id in watches:
            tick = TickRef(tick_id=f"{ref.run_id}-catch-up", watch_id=watch_id, mode="incremental")
            # One call reads at most MAX_EVENTS: read until the stream's end as it was when asked.
            for _ in range(CATCH_UP_CALLS):
                collected = await self.collect_changed_keys(tick)
                read += collected.events_read
                if collected.watermark_seq >= end or not collected.events_read:
                    break
            else:
                raise dependency_down(
                    f"the watch {watch_id} is more than {CATCH_UP_CALLS * MAX_EVENTS} events behind the stream"
                )
        return CatchUp(watches=watches, events_read=read)

    async def _read(self, js: Any, first: int, last: int, keys: Keys) -> tuple[int, int]:
        """Stream sequences ``first``..``last`` into ``keys``; returns the last sequence read and the count."""

        def on_event(subject: str, data: bytes, seq: int, at: datetime) -> None:
            note(keys, subject, data, seq, at)

        end, read, complete = await self.read_range(js, first, last, on_event, timeout=READ_TIMEOUT)
        if not complete:
            raise TimeoutError(f"{read} events in {READ_TIMEOUT:g} s")
        return end, read

    async def _store(self, tick: TickRef, keys: Keys, seq: int, *, reset: bool = False) -> int:
        """Store the keys and advance the watermark in one transaction (set back to ``seq`` and a full
        pass due after a ``reset`` stream); returns the watermark."""
        async with self._pool.acquire() as conn, conn.transaction():
            if keys:
                await conn.execute(
                    """INSERT INTO remediation.watch_keys (watch_id, key_kind, key, last_seq, worker_seq, last_event_at)
                       SELECT $1, k.kind, k.key, k.seq, k.worker, k.at
                       FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::timestamptz[])
                            AS k(kind, key, seq, worker, at)
                       ON CONFLICT (watch_id, key_kind, key) DO UPDATE SET
                           last_seq = greatest(watch_keys.last_seq, excluded.last_seq),
                           worker_seq = greatest(watch_keys.worker_seq, excluded.worker_seq),
                           last_event_at = greatest(watch_keys.last_event_at, excluded.last_event_at)""",
                    tick.watch_id,
                    [k[0] for k in keys],
                    [k[1] for k in keys],
                    [v[0] for v in keys.values()],
                    [v[1] for v in keys.values()],
                    [v[2] for v in keys.values()],
                )
            return int(
                await conn.fetchval(
                    """UPDATE remediation.watch_state
                       SET watermark_seq = CASE WHEN $3 THEN $2 ELSE greatest(coalesce(watermark_seq, 0), $2) END,
                           last_full_at = CASE WHEN $3 THEN NULL ELSE last_full_at END
                       WHERE watch_id = $1 RETURNING watermark_seq""",
                    tick.watch_id,
                    seq,
                    reset,
                )
                or 0
            )

    async def _worker_progress(self, js: Any) -> WorkerProgress:
        """The billing worker consumer's ack floor and backlog (keys with later events are in flight)."""
        try:
            info = await js.consumer_info(self._stream, self._consumer)
        except NotFoundError:
            return WorkerProgress()
        last = max(
            (s.last_active for s in (info.delivered, info.ack_floor) if s and s.last_active), default=None
        )
        return WorkerProgress(
            ack_floor=(info.ack_floor.stream_seq if info.ack_floor else 0) or 0,
            pending=info.num_pending or 0,
            ack_pending=info.num_ack_pending or 0,
            seconds_since_active=int((datetime.now(last.tzinfo) - last).total_seconds()) if last else None,
        )
