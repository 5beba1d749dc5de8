"""Reconciliation: the four checks for a scope, findings written to Postgres"""

from __future__ import annotations

import asyncio
import time

from temporalio import activity

from activities.heartbeat import heartbeating
from activities.postgres.base import CUSTOM_PLANS, RECONCILE_WORK_MEM, PostgresActivities, driver_errors
from activities.postgres.drift_sql import Check, checks, keyed_checks
from activities.postgres.platform_summary import record_platform_summary
from activities.postgres.reconcile_source import Source, decide
from contracts import names
from contracts.models import (
    ActionKind,
    DriftKind,
    LeftEntity,
    ReconcileRequest,
    ReconcileSummary,
)

# A finding this run's plans handed to the payments team (an investigate_payment action): expected to
# remain, so neither counted against verification nor named as left.
_HANDED_OVER = f"""SELECT 1 FROM remediation.plan_actions pa JOIN remediation.plans p ON p.plan_id = pa.plan_id
                   WHERE p.run_id = {{finding}}.run_id AND pa.entity_id = {{finding}}.entity_id
                     AND {{finding}}.kind = '{DriftKind.PAYMENT_DRIFT.value}'
                     AND pa.kind = '{ActionKind.INVESTIGATE_PAYMENT.value}'"""


class ReconcileActivities(PostgresActivities):
    """Reconciliation."""

    @activity.defn(name=names.RECONCILE)
    async def reconcile(self, request: ReconcileRequest) -> ReconcileSummary:
        """Run the scope's checks (all four, or ``kinds``); findings go to Postgres (idempotent per pass)."""
        ref = request.ref
        done: list[str] = []
        started = time.perf_counter()
        async with heartbeating(lambda: sorted(done)):
            source = await self._reconcile_checks(request, done)
        # Counted once, after the inserts: this call's kinds, or the whole pass (an earlier call's too).
        counts = await self._pass_counts(request)
        if not request.completes_pass:
            counts = {kind: counts[kind] for kind in done}
            return ReconcileSummary(
                pass_no=request.pass_no, counts=counts, total=sum(counts.values()), source=source.description
            )
        total = sum(counts.values())
        follow_ups, follow_up_orgs = await self._follow_ups(request)
        if ref.scope.is_global:
            await self._record_platform_drift(request, counts, started)
        await self._timeline(
            ref.run_id,
            f"reconcile:{request.pass_no}",
            "reconciling",
            f"reconciliation pass {request.pass_no}: {total} findings, from {source.description}",
            counts | {"watch_keys_checked": source.keys} if source.watch_id else counts,
        )
        left = await self._left(request) if request.name_left and total > follow_ups else []
        return ReconcileSummary(
            pass_no=request.pass_no,
            counts=counts,
            total=total,
            follow_ups=follow_ups,
            follow_up_orgs=follow_up_orgs,
            left=left,
            source=source.description,
        )

    async def _left(self, request: ReconcileRequest) -> list[LeftEntity]:
        """The first ``name_left`` findings of the pass not handed over, each with the run's latest plan
        action for the same record and that action's audited outcome and reason."""
        rows = await self._fetch(
            f"""WITH f AS (
                    SELECT f.* FROM remediation.findings f
                    WHERE f.run_id = $1 AND f.pass = $2
                      AND NOT EXISTS ({_HANDED_OVER.format(finding="f")})
                    ORDER BY f.kind, f.entity_id LIMIT $3)
                SELECT f.kind, f.entity_type, f.entity_id, f.org_id, f.amount_minor, o.currency,
                       pa.plan_id, pa.seq, pa.kind AS action, aa.outcome, aa.after->>'skipped' AS reason
                FROM f LEFT JOIN billing.orgs o ON o.id = f.org_id
                LEFT JOIN LATERAL (
                    SELECT pa.plan_id, pa.seq, pa.kind FROM remediation.plan_actions pa
                    JOIN remediation.plans p ON p.plan_id = pa.plan_id
                    WHERE p.run_id = $1 AND pa.entity_id = f.entity_id AND pa.entity_type = f.entity_type
                    ORDER BY p.pass DESC, pa.seq LIMIT 1) pa ON true
                LEFT JOIN remediation.applied_actions aa ON aa.plan_id = pa.plan_id AND aa.seq = pa.seq
                ORDER BY f.kind, f.entity_id""",
            request.ref.run_id,
            request.pass_no,
            request.name_left,
        )
        return [LeftEntity(**dict(r)) for r in rows]

    async def _pass_counts(self, request: ReconcileRequest) -> dict[str, int]:
        """Findings of the pass by kind, every kind listed (zero included), in DriftKind order."""
        rows = await self._fetch(
            """SELECT kind, count(*) AS n FROM remediation.findings WHERE run_id = $1 AND pass = $2
               GROUP BY kind""",
            request.ref.run_id,
            request.pass_no,
        )
        found = {r["kind"]: int(r["n"]) for r in rows}
        return {kind.value: found.get(kind.value, 0) for kind in DriftKind}

    async def _record_platform_drift(
        self, request: ReconcileRequest, counts: dict[str, int], started: float
    ) -> None:
        """A platform-wide pass measured the whole platform's drift: scoped runs may read it."""
        orgs = await self._fetchval(
            "SELECT count(DISTINCT org_id) FROM remediation.findings WHERE run_id = $1 AND pass = $2",
            request.ref.run_id,
            request.pass_no,
        )
        took = int((time.perf_counter() - started) * 1000)
        with driver_errors():
            await record_platform_summary(
                self._pool, f"reconcile {request.ref.run_id}", counts, int(orgs), None, took
            )

    async def _follow_ups(self, request: ReconcileRequest) -> tuple[int, list[str]]:
        """Payment findings of the pass that this run's plans already handed to the payments team, and their orgs."""
        # Only once the run has a plan can there be any (and reading plan_actions before then would
        # wait on a plan being written).
        if not await self._fetchval(
            "SELECT EXISTS (SELECT 1 FROM remediation.plans WHERE run_id = $1)", request.ref.run_id
        ):
            return 0, []
        row = await self._fetchrow(
            f"""SELECT count(*) AS n, coalesce(array_agg(DISTINCT f.org_id), '{{}}') AS orgs
                FROM remediation.findings f
                WHERE f.run_id = $1 AND f.pass = $2 AND EXISTS ({_HANDED_OVER.format(finding="f")})""",
            request.ref.run_id,
            request.pass_no,
        )
        return int(row["n"]), sorted(o for o in row["orgs"] if o)

    async def _reconcile_checks(self, request: ReconcileRequest, done: list[str]) -> Source:
        """Each check is one set-based INSERT ... SELECT into the findings table; the four run concurrently,
        over the scope, or over the keys the drift watch names when the pass's source is the watch."""
        ref = request.ref
        async with self._transaction() as conn:
            source, keys = await decide(conn, request)
        if source.watch_id is None:
            chosen = checks(ref.scope, 3)
        else:
            allocations = [k["key"] for k in keys if k["kind"] == "allocation"]
            chosen = keyed_checks(3, allocations, [k["key"] for k in keys if k["kind"] == "payment_session"])

        async def run(kind: DriftKind, check: Check) -> None:
            async with self._transaction() as conn:
                # Room for the scoped anti-joins' hashes; without it they spill to disk in batches.
                await conn.execute(f"SET LOCAL work_mem = '{RECONCILE_WORK_MEM}'")
                await conn.execute(CUSTOM_PLANS)
                await conn.execute(
                    f"""INSERT INTO remediation.findings (run_id, pass, kind, entity_type, entity_id, org_id,
                            project_id, user_id, allocation_id, amount_minor, detail)
                        SELECT $1, $2, q.* FROM ({check.statement()}) q ON CONFLICT DO NOTHING""",
                    ref.run_id,
                    request.pass_no,
                    *check.params,
                )
            done.append(kind.value)

        wanted = request.kinds or list(DriftKind)
        await asyncio.gather(*(run(kind, check) for kind, check in chosen.items() if kind in wanted))
        return source
