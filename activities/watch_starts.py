"""Acting on the watch's drift: start the remediation of each scope with drift, or join the running one.

One signal-with-start per scope (the worker passes `remediation_client.start` with the finding as the
notice): the remediation's workflow id is derived from its scope, so an alert, a tick and a commander's
`start` arriving together still make one run, and the finding is recorded on whichever run that is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import asyncpg
from temporalio import activity

from contracts import names
from contracts.models import ActionKind, AlertNotice, RemediationRequest, Scope, Trigger
from contracts.watch import Acted, ActRequest

ACTOR = "drift-watch"
# Start the remediation or join the running one, recording the notice on it: (workflow id, joined).
StartOrJoin = Callable[[RemediationRequest, AlertNotice], Awaitable[tuple[str, bool]]]


class WatchStartActivities:
    """Starts or joins remediations through the worker's Temporal client (``start_or_join``)."""

    def __init__(self, pool: asyncpg.Pool, start_or_join: StartOrJoin | None) -> None:
        self._pool = pool
        self._start_or_join = start_or_join

    @activity.defn(name=names.WATCH_ACT)
    async def act_on_drift(self, request: ActRequest) -> list[Acted]:
        """Group the tick's findings by scope; below the threshold record them, else start or join."""
        if self._start_or_join is None:
            raise RuntimeError("no Temporal client: the watch cannot start remediations")
        tick, config = request.tick, request.config
        # A payment a remediation already handed to the payments team (investigate_payment) stays
        # drift until they close it: counted, never a new remediation on every pass.
        rows = await self._pool.fetch(
            f"""SELECT f.org_id, f.kind, count(*) AS n,
                       count(*) FILTER (WHERE EXISTS (
                           SELECT 1 FROM remediation.plan_actions pa WHERE pa.entity_id = f.entity_id
                             AND pa.entity_type = f.entity_type
                             AND pa.kind = '{ActionKind.INVESTIGATE_PAYMENT.value}')) AS handed_over
                FROM remediation.watch_findings f WHERE f.tick_id = $1
                GROUP BY f.org_id, f.kind ORDER BY f.org_id, f.kind""",
            tick.tick_id,
        )
        by_org: dict[str, dict[str, int]] = {}
        handed_over = 0
        for r in rows:
            handed_over += int(r["handed_over"])
            if int(r["n"]) > int(r["handed_over"]):
                by_org.setdefault(r["org_id"], {})[r["kind"]] = int(r["n"]) - int(r["handed_over"])
        groups: list[tuple[Scope, dict[str, int]]]
        if not by_org:
            groups = []
        elif not config.scope.is_global:
            groups = [(config.scope, _merge(by_org.values()))]
        elif len(by_org) >= config.widespread_orgs:
            groups = [(Scope(), _merge(by_org.values()))]  # widespread: one platform-wide remediation
        else:
            groups = [(Scope(org_id=org), kinds) for org, kinds in by_org.items()]
        acted = (
            [Acted(scope=config.scope.key(), findings=handed_over, action="handed_over")]
            if handed_over
            else []
        )
        for scope, kinds in groups:
            total = sum(kinds.values())
            if total < config.act_threshold:
                acted.append(Acted(scope=scope.key(), findings=total, action="recorded"))
                continue
            found = ", ".join(f"{k}={v}" for k, v in kinds.items())
            notice = AlertNotice(
                source="drift-watch",
                name="DriftDetected",
                status="firing",
                fingerprint=f"{tick.tick_id}:{scope.key()}"[:200],
                correlation_id=tick.tick_id,
                summary=f"drift watch tick {tick.tick_id} ({tick.mode}): {found}"[:300],
            )
            workflow_id, joined = await self._start_or_join(
                RemediationRequest(
                    correlation_id=_correlation(tick.tick_id),
                    scope=scope,
                    trigger=Trigger.DRIFT_DETECTED,
                    requested_by=ACTOR,
                ),
                notice,
            )
            acted.append(
                Acted(
                    scope=scope.key(),
                    findings=total,
                    action="joined" if joined else "started",
                    workflow_id=workflow_id,
                )
            )
            activity.heartbeat(len(acted))
        return acted


def _merge(groups: Iterable[dict[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for kinds in groups:
        for kind, n in kinds.items():
            merged[kind] = merged.get(kind, 0) + n
    return merged


def _correlation(tick_id: str) -> str:
    """The tick's id as a correlation id (the ID pattern: letters, digits and ._:-)."""
    return "".join(c if c.isalnum() or c in "._:-" else "-" for c in tick_id)[:128]
