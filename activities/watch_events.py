"""The drift watch's reading of the platform's events: a durable JetStream consumer of its own.

Each event names the keys it changed (an allocation, a payment session). A tick stores those keys in
Postgres and only then acknowledges the events: the watermark never passes an event whose keys are not
stored. The billing worker's consumer says which of them it has not processed yet (still in flight).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import asyncpg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from temporalio import activity

from activities.errors import dependency_down
from activities.nats_jetstream import NatsActivities
from contracts import names
from contracts.watch import CollectResult, TickRef, WorkerProgress

# What changes billing: provisioning (the worker's input), billing's own events, payments.
WATCH_SUBJECTS = ["provisioning.>", "billing.>", "payments.>"]
WORKER_SUBJECTS = "provisioning."  # the billing worker consumes these
BATCH = 5000
MAX_EVENTS = 50_000  # per tick; the rest waits for the next (the watermark says where)
FETCH_WAIT = 5.0  # only reached when the stream lost what the consumer counted


def consumer_name(watch_id: str) -> str:
    """The watch's durable consumer on the platform's stream."""
    return f"remediation-watch-{watch_id}"


def watch_consumer_config(watch_id: str) -> ConsumerConfig:
    """From now on (the first tick is a full pass), every billing event, acknowledged in bulk after storing."""
    return ConsumerConfig(
        durable_name=consumer_name(watch_id),
        deliver_policy=DeliverPolicy.NEW,
        ack_policy=AckPolicy.ALL,
        filter_subjects=WATCH_SUBJECTS,
        max_ack_pending=MAX_EVENTS + BATCH,
        ack_wait=600,
    )


def keys_of(data: dict[str, Any]) -> list[tuple[str, str]]:
    """The (kind, key) pairs an event names."""
    keys = []
    if isinstance(data.get("allocation_id"), str):
        keys.append(("allocation", data["allocation_id"]))
    if isinstance(data.get("payment_session_id"), str):
        keys.append(("payment_session", data["payment_session_id"]))
    return keys


class WatchEventActivities(NatsActivities):
    """Reads the platform's stream for the watch; shares the worker's lazily (re)connected client."""

    def __init__(self, url: str, stream: str, worker_consumer: str, pool: asyncpg.Pool) -> None:
        super().__init__(url, stream, worker_consumer, 0)
        self._pool = pool

    @activity.defn(name=names.WATCH_COLLECT_EVENTS)
    async def collect_changed_keys(self, tick: TickRef) -> CollectResult:
        """Read up to MAX_EVENTS new events; store the keys they name; then acknowledge them."""
        js = (await self._client()).jetstream()
        try:
            try:
                info = await js.consumer_info(self._stream, consumer_name(tick.watch_id))
            except NotFoundError:
                info = await js.add_consumer(self._stream, watch_consumer_config(tick.watch_id))
            sub = await js.pull_subscribe_bind(consumer_name(tick.watch_id), self._stream)
        except (NatsError, TimeoutError) as exc:
            raise dependency_down(f"NATS: the watch's consumer failed: {type(exc).__name__}") from exc
        # What is waiting now is this tick's work: read exactly that, never idle on an empty stream.
        waiting = min(int(info.num_pending or 0), MAX_EVENTS)
        # (kind, key) -> newest stream seq, newest seq the worker consumes, newest event time
        keys: dict[tuple[str, str], tuple[int, int, datetime]] = {}
        read, last = 0, None
        try:
            while read < waiting:
                try:
                    batch = await sub.fetch(min(BATCH, waiting - read), timeout=FETCH_WAIT)
                except NatsTimeout:
                    break
                for msg in batch:
                    meta = msg.metadata
                    seq, at = meta.sequence.stream, meta.timestamp
                    consumed = seq if msg.subject.startswith(WORKER_SUBJECTS) else 0
                    try:
                        data = json.loads(msg.data)
                    except ValueError:
                        data = {}
                    for key in keys_of(data if isinstance(data, dict) else {}):
                        old = keys.get(key)
                        if old is None:
                            keys[key] = (seq, consumed, at)
                        elif seq > old[0]:
                            keys[key] = (seq, max(consumed, old[1]), at)
                    last = msg
                read += len(batch)
                activity.heartbeat(read)
            watermark = await self._store(tick, keys, last.metadata.sequence.stream if last else 0)
            if last is not None:
                await last.ack()  # AckPolicy.ALL: every event up to it, now that its keys are stored
            worker = await self._worker_progress(js)
        except (NatsError, TimeoutError) as exc:
            raise dependency_down(f"NATS: reading the watch's events failed: {type(exc).__name__}") from exc
        finally:
            await sub.unsubscribe()
        return CollectResult(events_read=read, keys_stored=len(keys), watermark_seq=watermark, worker=worker)

    async def _store(
        self, tick: TickRef, keys: dict[tuple[str, str], tuple[int, int, datetime]], seq: int
    ) -> int:
        """Store the keys and advance the watermark in one transaction; returns the watermark."""
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
                    """UPDATE remediation.watch_state SET watermark_seq = greatest(watermark_seq, $2)
                       WHERE watch_id = $1 RETURNING watermark_seq""",
                    tick.watch_id,
                    seq,
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
