"""Where a reconciliation pass reads its findings: a full reconciliation, or the drift watch's state.

A platform-wide plan may start from the watch instead of reading every row: the watch's last full
pass found all drift then, and since then every event-named key was checked by a tick (its findings
stored) or waits in ``watch_keys`` (the workflow first brings the watch up to the stream's end, and
does not ask while the outbox relay is behind). Re-checking now the keys named by those findings plus
the waiting keys gives what a full pass would find, except for changes no event named since the full
pass (hand edits): the verification's full pass reads those, and apply re-checks every row. Only a
watch that is keeping up is used (see ``_usable``); the pass records which source it used and how old
it is, and the plan shows that sentence.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import asyncpg

from activities.postgres.platform_summary import age_words
from contracts.models import ReconcileRequest

# A watch is used when its last successful tick is at most this many intervals old (the same
# staleness its alert rule pages for) and its last full pass at most its full interval plus these.
STALE_INTERVALS = 3


class Source(NamedTuple):
    """A pass's decided source: ``watch_id`` and its full pass's start when the watch's state is used."""

    description: str
    watch_id: str | None = None
    full_tick_id: str | None = None
    full_started_at: datetime | None = None  # findings of the watch's ticks since then are re-checked
    keys: int = 0


# The watch's last full pass is the one that set ``last_full_at`` (in the transaction after all its
# findings were stored, so a tick still acting on them counts); its last tick, the newer of that and its
# last successful one.
_WATCH = """SELECT s.watch_id, s.every_seconds, s.full_every_seconds, f.tick_id AS full_tick,
                   f.started_at AS full_started,
                   extract(epoch FROM now() - s.last_full_at)::bigint AS full_age,
                   extract(epoch FROM now() - greatest(t.finished_at, s.last_full_at))::bigint AS tick_age
            FROM remediation.watch_state s
            LEFT JOIN LATERAL (SELECT tick_id, started_at FROM remediation.watch_ticks
                               WHERE watch_id = s.watch_id AND mode = 'full' AND started_at <= s.last_full_at
                               ORDER BY started_at DESC LIMIT 1) f ON true
            LEFT JOIN LATERAL (SELECT finished_at FROM remediation.watch_ticks
                               WHERE watch_id = s.watch_id AND outcome = 'ok'
                               ORDER BY started_at DESC LIMIT 1) t ON true
            WHERE s.scope = '{}'::jsonb
            ORDER BY s.last_full_at DESC NULLS LAST LIMIT 1"""

# The keys to re-check: those named by the watch's findings since its full pass, and those waiting.
WATCH_KEYS = """SELECT DISTINCT kind, key FROM (
                    SELECT CASE WHEN wf.entity_type = 'payment_session' THEN 'payment_session'
                                ELSE 'allocation' END AS kind,
                           CASE WHEN wf.entity_type = 'payment_session' THEN wf.entity_id
                                ELSE wf.allocation_id END AS key
                    FROM remediation.watch_ticks t JOIN remediation.watch_findings wf USING (tick_id)
                    -- A tick that began before the full pass may have checked keys after it.
                    WHERE t.watch_id = $1 AND (t.started_at >= $2 OR t.finished_at IS NULL OR t.finished_at >= $2)
                      AND wf.found_at >= $2
                    UNION ALL
                    SELECT key_kind, key FROM remediation.watch_keys WHERE watch_id = $1) k
                WHERE key IS NOT NULL"""


def _usable(row: asyncpg.Record | None) -> str | None:
    """None when the watch's state may stand for a full pass; else why not (a sentence's end)."""
    if row is None:
        return "no drift watch covers the whole platform"
    watch = f"drift watch '{row['watch_id']}'"
    if row["full_tick"] is None:
        return f"{watch} has not completed a full pass"
    if row["tick_age"] is None or row["tick_age"] > STALE_INTERVALS * row["every_seconds"]:
        return (
            f"{watch} has not ticked successfully for {STALE_INTERVALS} intervals of {row['every_seconds']} s"
        )
    if row["full_age"] > row["full_every_seconds"] + STALE_INTERVALS * row["every_seconds"]:
        return f"{watch}'s last full pass is {age_words(row['full_age'])} old, past its interval"
    return None


async def decide(conn: asyncpg.Connection, request: ReconcileRequest) -> tuple[Source, list[asyncpg.Record]]:
    """The pass's source, decided by its first call and recorded (later calls of the pass follow it),
    and the keys to check when it is the watch's state."""
    ref = request.ref
    read = "SELECT * FROM remediation.reconcile_sources WHERE run_id = $1 AND pass = $2"
    recorded = await conn.fetchrow(read, ref.run_id, request.pass_no)
    keys: list[asyncpg.Record] | None = None
    if recorded is None:
        chosen, keys = await _choose(conn, request)
        await conn.execute(
            """INSERT INTO remediation.reconcile_sources (run_id, pass, source, watch_id, full_tick_id,
                   full_started_at, keys_checked, description)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (run_id, pass) DO NOTHING""",
            ref.run_id,
            request.pass_no,
            "watch" if chosen.watch_id else "full",
            chosen.watch_id,
            chosen.full_tick_id,
            chosen.full_started_at,
            chosen.keys,
            chosen.description,
        )
        recorded = await conn.fetchrow(read, ref.run_id, request.pass_no)
    source = Source(
        recorded["description"],
        recorded["watch_id"],
        recorded["full_tick_id"],
        recorded["full_started_at"],
        recorded["keys_checked"],
    )
    if source.watch_id is None:
        return source, []
    # A later call of the pass (or a concurrent first one that lost) reads the keys as they are now.
    if keys is None or source.description != chosen.description:
        keys = await conn.fetch(WATCH_KEYS, source.watch_id, source.full_started_at)
    return source, keys


async def _choose(conn: asyncpg.Connection, request: ReconcileRequest) -> tuple[Source, list[asyncpg.Record]]:
    full = f"a full reconciliation of {request.ref.scope.describe()}"
    if request.from_watch_refused:
        return Source(f"{full} (not from the drift watch: {request.from_watch_refused})"), []
    if not (request.from_watch and request.ref.scope.is_global):
        return Source(full), []
    row = await conn.fetchrow(_WATCH)
    why_not = _usable(row)
    if why_not is not None or row is None:
        return Source(f"{full} ({why_not})"), []
    keys = await conn.fetch(WATCH_KEYS, row["watch_id"], row["full_started"])
    return Source(
        f"drift watch '{row['watch_id']}': its full pass {age_words(row['full_age'])} old (tick {row['full_tick']});"
        f" the {len(keys)} keys it found drifted or saw change since, checked now; its last tick"
        f" {age_words(row['tick_age'])} ago. Hand edits since the full pass are the verification's full pass"
        " to find; apply re-checks every row",
        row["watch_id"],
        row["full_tick"],
        row["full_started"],
        len(keys),
    ), keys
