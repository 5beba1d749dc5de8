"""The drift watch in Postgres: each tick's record, the changed keys' checks, the full pass."""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg
from temporalio import activity

from activities.postgres.base import CUSTOM_PLANS, RECONCILE_WORK_MEM, PostgresActivities, driver_errors
from activities.postgres.drift_sql import FINDING_COLUMNS, Check, checks, keyed_checks
from activities.postgres.platform_summary import record_platform_summary
from contracts import names
from contracts.models import DriftKind, Scope
from contracts.watch import CheckRequest, FinishTick, PassResult, PlanTick, TickRef, WatchConfig

# The findings' columns, named, and the scope a watch keeps to (a keyed check sees every changed key).
_FINDINGS = f"AS q({', '.join(FINDING_COLUMNS)})"
_IN_SCOPE = """($3::text IS NULL OR q.org_id = $3) AND ($4::text IS NULL OR q.project_id = $4)
               AND ($5::text IS NULL OR q.user_id = $5) AND ($6::text IS NULL OR q.allocation_id = $6)"""
# Keys in flight: younger than the settle time, or with an event the billing worker has not acknowledged.
_IN_FLIGHT = "(k.last_event_at > now() - ($2::int * interval '1 second') OR k.worker_seq > $3)"


def _lock(watch_id: str) -> str:
    """One pass of a watch at a time (a manual run beside a scheduled tick checks each key once)."""
    return f"SELECT pg_advisory_xact_lock(hashtextextended('remediation.watch:{watch_id}', 0))"


def _scope_args(scope: Scope) -> list[str | None]:
    return [scope.org_id, scope.project_id, scope.user_id, scope.allocation_id]


async def _forget(conn: asyncpg.Connection, watch_id: str, keys: list[asyncpg.Record]) -> None:
    """Remove checked keys, in the transaction storing their findings; a key an event named again
    since (its last_seq moved) stays for the next tick."""
    await conn.execute(
        """DELETE FROM remediation.watch_keys k USING unnest($2::text[], $3::text[], $4::bigint[]) AS s(kind, key, seq)
           WHERE k.watch_id = $1 AND k.key_kind = s.kind AND k.key = s.key AND k.last_seq = s.seq""",
        watch_id,
        [r["key_kind"] for r in keys],
        [r["key"] for r in keys],
        [r["last_seq"] for r in keys],
    )


class WatchDatabaseActivities(PostgresActivities):
    """The watch's ticks, keys and findings."""

    @activity.defn(name=names.WATCH_PLAN_TICK)
    async def plan_tick(self, plan: PlanTick) -> TickRef:
        """Store the watch's configuration; a full pass when forced, never done, or older than its interval."""
        config = plan.request.config
        async with self._transaction() as conn:
            due = await conn.fetchval(
                """INSERT INTO remediation.watch_state (watch_id, scope, every_seconds, full_every_seconds,
                       settle_seconds, act_threshold)
                   VALUES ($1, $2, $3, $4, $5, $6)
                   ON CONFLICT (watch_id) DO UPDATE SET scope = excluded.scope,
                       every_seconds = excluded.every_seconds, full_every_seconds = excluded.full_every_seconds,
                       settle_seconds = excluded.settle_seconds, act_threshold = excluded.act_threshold,
                       updated_at = now()
                   RETURNING last_full_at IS NULL OR last_full_at < now() - ($4::int * interval '1 second')""",
                config.watch_id,
                config.scope.model_dump_json(exclude_none=True),
                config.every_seconds,
                config.full_every_seconds,
                config.settle_seconds,
                config.act_threshold,
            )
            mode = "full" if plan.request.force_full or due else "incremental"
            # A retried activity keeps the mode it first chose.
            chosen = await conn.fetchval(
                """INSERT INTO remediation.watch_ticks (tick_id, watch_id, mode) VALUES ($1, $2, $3)
                   ON CONFLICT (tick_id) DO UPDATE SET mode = remediation.watch_ticks.mode RETURNING mode""",
                plan.tick_id,
                config.watch_id,
                mode,
            )
        return TickRef(tick_id=plan.tick_id, watch_id=config.watch_id, mode=chosen)

    @activity.defn(name=names.WATCH_CHECK_KEYS)
    async def check_changed_keys(self, request: CheckRequest) -> PassResult:
        """The runbook's four checks for exactly the settled changed keys; their findings stored and the
        keys removed in one transaction (the watermark's other half)."""
        tick, config = request.tick, request.config
        async with self._transaction() as conn:
            await conn.execute(_lock(tick.watch_id))
            settled = await conn.fetch(
                f"""SELECT k.key_kind, k.key, k.last_seq FROM remediation.watch_keys k
                    WHERE k.watch_id = $1 AND NOT {_IN_FLIGHT} FOR UPDATE""",
                tick.watch_id,
                config.settle_seconds,
                request.worker.ack_floor,
            )
            allocations = [r["key"] for r in settled if r["key_kind"] == "allocation"]
            sessions = [r["key"] for r in settled if r["key_kind"] == "payment_session"]
            if settled:
                await conn.execute(CUSTOM_PLANS)
                for check in keyed_checks(7, allocations, sessions).values():
                    await self._store(conn, tick, config, check)
                await _forget(conn, tick.watch_id, settled)
            deferred, why = await self._deferred(conn, request)
        return PassResult(
            keys_checked=len(settled),
            keys_deferred=deferred,
            deferred_why=why,
            findings=await self._counts(tick.tick_id),
        )

    @staticmethod
    async def _store(
        conn: asyncpg.Connection,
        tick: TickRef,
        config: WatchConfig,
        check: Check,
        *params: object,
        exclude: str = "",
    ) -> None:
        await conn.execute(
            f"""INSERT INTO remediation.watch_findings (tick_id, kind, entity_type, entity_id, org_id, project_id,
                    user_id, allocation_id, amount_minor, detail, settle_seconds)
                SELECT $1, q.*, $2 FROM ({check.statement()}) {_FINDINGS}
                WHERE {_IN_SCOPE} {exclude}
                ON CONFLICT DO NOTHING""",
            tick.tick_id,
            config.settle_seconds,
            *_scope_args(config.scope),
            *params,
            *check.params,
        )

    async def _deferred(self, conn: asyncpg.Connection, request: CheckRequest) -> tuple[int, str]:
        """Keys left for a later tick, and why: in flight is not drift."""
        row = await conn.fetchrow(
            """SELECT count(*) FILTER (WHERE k.last_event_at > now() - ($2::int * interval '1 second')) AS young,
                      count(*) FILTER (WHERE k.last_event_at <= now() - ($2::int * interval '1 second')
                                         AND k.worker_seq > $3) AS unprocessed
               FROM remediation.watch_keys k WHERE k.watch_id = $1""",
            request.tick.watch_id,
            request.config.settle_seconds,
            request.worker.ack_floor,
        )
        young, unprocessed = int(row["young"]), int(row["unprocessed"])
        parts = []
        if young:
            parts.append(f"{young} changed less than {request.config.settle_seconds} s ago (settle time)")
        if unprocessed:
            worker = request.worker
            parts.append(
                f"{unprocessed} with events the billing worker has not acknowledged yet (its consumer:"
                f" {worker.pending} undelivered, {worker.ack_pending} unacknowledged, ack floor {worker.ack_floor});"
                " a worker that stopped consuming is BillingQueueLag's to alert on, not drift"
            )
        return young + unprocessed, "; ".join(parts)

    async def _counts(self, tick_id: str) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT kind, count(*) AS n FROM remediation.watch_findings WHERE tick_id = $1 GROUP BY kind",
            tick_id,
        )
        found = {r["kind"]: int(r["n"]) for r in rows}
        return {kind.value: found.get(kind.value, 0) for kind in DriftKind}

    @activity.defn(name=names.WATCH_FULL_RECONCILE)
    async def full_pass(self, request: CheckRequest) -> PassResult:
        """The four checks over the watch's whole scope (changes that bypassed events), keys in flight
        excepted; refreshes the platform summary when the scope is the platform."""
        tick, config = request.tick, request.config
        started = time.perf_counter()
        async with self._transaction() as conn:
            await conn.execute(_lock(tick.watch_id))
            keys = await conn.fetch(
                f"""SELECT k.key_kind, k.key, k.last_seq, {_IN_FLIGHT} AS in_flight
                    FROM remediation.watch_keys k WHERE k.watch_id = $1""",
                tick.watch_id,
                config.settle_seconds,
                request.worker.ack_floor,
            )
        flight = [r for r in keys if r["in_flight"]]
        allocations = [r["key"] for r in flight if r["key_kind"] == "allocation"]
        sessions = [r["key"] for r in flight if r["key_kind"] == "payment_session"]
        skip = """AND NOT (coalesce(q.allocation_id, '') = ANY($7::text[])
                           OR (q.entity_type = 'payment_session' AND q.entity_id = ANY($8::text[])))"""

        async def run(check: Check) -> None:
            async with self._transaction() as conn:
                await conn.execute(f"SET LOCAL work_mem = '{RECONCILE_WORK_MEM}'")
                await conn.execute(CUSTOM_PLANS)
                await self._store(conn, tick, config, check, allocations, sessions, exclude=skip)

        with driver_errors():
            await asyncio.gather(*(run(check) for check in checks(config.scope, 9).values()))
            async with self._transaction() as conn:
                await conn.execute(_lock(tick.watch_id))
                # The keys settled when the pass began were covered by it; one changed since is kept.
                await _forget(conn, tick.watch_id, [r for r in keys if not r["in_flight"]])
                await conn.execute(
                    "UPDATE remediation.watch_state SET last_full_at = now() WHERE watch_id = $1",
                    tick.watch_id,
                )
                deferred, why = await self._deferred(conn, request)
        counts = await self._counts(tick.tick_id)
        if config.scope.is_global:
            orgs = await self._fetchval(
                "SELECT count(DISTINCT org_id) FROM remediation.watch_findings WHERE tick_id = $1",
                tick.tick_id,
            )
            took = int((time.perf_counter() - started) * 1000)
            with driver_errors():
                await record_platform_summary(
                    self._pool, f"drift watch {tick.tick_id}", counts, int(orgs), None, took
                )
        return PassResult(keys_checked=0, keys_deferred=deferred, deferred_why=why, findings=counts)

    @activity.defn(name=names.WATCH_FINISH_TICK)
    async def finish_tick(self, finish: FinishTick) -> None:
        """Record how the tick ended (what `watch status` and the metrics read)."""
        result = finish.result
        await self._execute(
            """UPDATE remediation.watch_ticks SET finished_at = now(), outcome = $2, error = $3,
                   events_read = $4, keys_checked = $5, keys_deferred = $6, deferred_why = $7,
                   findings = $8, acted = $9
               WHERE tick_id = $1""",
            finish.tick.tick_id,
            finish.outcome,
            finish.error,
            result.events_read if result else 0,
            result.keys_checked if result else 0,
            result.keys_deferred if result else 0,
            result.deferred_why if result else None,
            json.dumps(result.findings if result else {}),
            json.dumps([a.model_dump() for a in result.acted] if result else []),
        )
