"""Activities on NATS JetStream: billing worker consumer health, event sequences, escalations."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from temporalio import activity

from activities.errors import dependency_down
from contracts import names
from contracts.models import CheckResult, EscalationRequest, RunRef

SCAN_LIMIT = 20_000
SCAN_TIMEOUT = 30  # seconds for the diagnosis's read; what arrived by then is judged
ORDER = {"provisioning.active": 0, "provisioning.releasing.completed": 1, "provisioning.release_failed": 1}


class NatsActivities:
    """Reads the platform's stream; one lazily (re)connected client per worker."""

    def __init__(self, url: str, stream: str, consumer: str, pending_threshold: int) -> None:
        self._url = url
        self._stream = stream
        self._consumer = consumer
        self._threshold = pending_threshold
        self._nc: NATS | None = None

    async def _client(self) -> NATS:
        if self._nc is not None and self._nc.is_connected:
            return self._nc
        try:
            # No reconnect loop here: an outage must surface as a finding, not a hang.
            self._nc = await asyncio.wait_for(
                nats.connect(
                    self._url,
                    connect_timeout=2,
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    error_cb=_quiet,
                ),
                timeout=5,
            )
        except (OSError, NatsError, TimeoutError) as exc:
            raise dependency_down(f"NATS unreachable: {type(exc).__name__}") from exc
        return self._nc

    async def read_range(
        self,
        js: Any,
        first: int,
        last: int,
        on_event: Callable[[str, bytes, int, datetime], None],
        *,
        timeout: float,
    ) -> tuple[int, int, bool]:
        """Hand stream sequences ``first``..``last`` to ``on_event`` (subject, data, seq, time) in order;
        returns the last sequence read, how many, and whether it reached ``last`` before ``timeout``.

        An ordered (ephemeral, flow-controlled push) consumer: several times cheaper per event than
        pulling, and nothing is left on the server afterwards.
        """
        done = asyncio.Event()
        seen = [first - 1, 0]

        async def on_msg(msg: Any) -> None:
            meta = msg.metadata
            seq = meta.sequence.stream
            if seq > last or done.is_set():
                done.set()
                return
            on_event(msg.subject, msg.data, seq, meta.timestamp)
            seen[0], seen[1] = seq, seen[1] + 1
            if seq >= last or not meta.num_pending:
                done.set()
            elif seen[1] % 5000 == 0:
                activity.heartbeat(seen[1])

        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first)
        sub = await js.subscribe(">", stream=self._stream, ordered_consumer=True, config=config, cb=on_msg,
                                 pending_msgs_limit=max(2 * (last - first + 1), 1000))  # fmt: skip
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            return seen[0], seen[1], False
        finally:
            await sub.unsubscribe()
        return seen[0], seen[1], True

    async def close(self) -> None:
        """Close the connection (worker shutdown)."""
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()

    @activity.defn(name=names.CHECK_CONSUMER)
    async def check_consumer(self, ref: RunRef) -> CheckResult:
        """Pending, ack-pending, redeliveries and last activity of the billing worker's consumer."""
        js = (await self._client()).jetstream()
        try:
            info = await js.consumer_info(self._stream, self._consumer)
        except NotFoundError:
            return CheckResult(
                check="nats_consumer",
                status="critical",
                headline=f"consumer {self._consumer} on {self._stream} does not exist",
            )
        except (NatsError, TimeoutError) as exc:
            raise dependency_down(f"NATS consumer info failed: {type(exc).__name__}") from exc
        pending = info.num_pending or 0
        ack_pending = info.num_ack_pending or 0
        redelivered = info.num_redelivered or 0
        max_ack = info.config.max_ack_pending or 1000
        last = max(
            (s.last_active for s in (info.delivered, info.ack_floor) if s and s.last_active), default=None
        )
        since = int((datetime.now(UTC) - last).total_seconds()) if last else None
        problems: list[str] = []
        status = "ok"
        if pending > 0 and (since is None or since >= 300):
            status, problems = (
                "critical",
                [
                    f"stalled: {pending} pending, no activity "
                    + ("ever" if since is None else f"for {since}s")
                ],
            )
        elif pending > 1000 or ack_pending >= 0.8 * max_ack:
            status, problems = "critical", [f"lagging: {pending} pending, {ack_pending} ack-pending"]
        elif pending + ack_pending > self._threshold or redelivered > 0:
            status, problems = (
                "warn",
                [f"{pending} pending, {ack_pending} unacknowledged, {redelivered} redelivered"],
            )
        counts = {
            "pending": pending,
            "ack_pending": ack_pending,
            "redelivered": redelivered,
            "ack_floor": (info.ack_floor.stream_seq if info.ack_floor else 0) or 0,
            "backlog_head": await self._backlog_head(js, info.config),
        }
        if since is not None:
            counts["seconds_since_active"] = since
        headline = "; ".join(problems) or f"healthy: {pending} pending, last active {since}s ago"
        return CheckResult(check="nats_consumer", status=status, headline=headline, counts=counts)

    async def _backlog_head(self, js: Any, config: ConsumerConfig) -> int:
        """Stream sequence of the newest message the consumer must process (0: none).

        Verification asks whether the ack floor passes it: then everything queued when the window
        opened was acknowledged, not merely delivered (a poison-message loop delivers and never acks).
        """
        subjects = [s for s in [config.filter_subject, *(config.filter_subjects or [])] if s] or [">"]
        head = 0
        for subject in subjects:
            try:
                head = max(head, (await js.get_last_msg(self._stream, subject)).seq or 0)
            except NotFoundError:
                continue
            except (NatsError, TimeoutError) as exc:
                raise dependency_down(f"NATS last message of {subject} failed: {type(exc).__name__}") from exc
        return head

    @activity.defn(name=names.READ_EVENT_SEQUENCE)
    async def read_event_sequence(self, ref: RunRef) -> CheckResult:
        """provisioning.active → releasing.completed|release_failed per allocation in scope; gaps and disorder."""
        js = (await self._client()).jetstream()
        # Read up to the stream's last sequence as of now, so the scan ends without waiting on a timeout,
        # and at most its newest SCAN_LIMIT events: an incident is recent, and a stream kept for weeks
        # would otherwise be read from its oldest events and never reach the incident's.
        state = (await js.stream_info(self._stream)).state
        last_seq = state.last_seq or 0
        first = max(state.first_seq or 1, last_seq - SCAN_LIMIT + 1, 1)
        windowed = first > max(state.first_seq or 1, 1)
        by_alloc: dict[str, list[str]] = {}
        in_scope: set[str] = set()
        counts = {"events": 0, "billing": 0, "payments": 0}

        def collect(subject: str, data: bytes, _seq: int, _at: datetime) -> None:
            self._collect(ref, subject, _decode(data), by_alloc, in_scope, counts)

        scanned, complete = 0, True
        if state.messages and first <= last_seq:
            _, scanned, complete = await self.read_range(js, first, last_seq, collect, timeout=SCAN_TIMEOUT)
        gaps = out_of_order = before_window = 0
        for alloc in in_scope:
            seq = [ORDER[s] for s in by_alloc.get(alloc, []) if s in ORDER]
            if seq and seq[0] != 0:
                # In a window, a first event that is not the activation may follow one before it.
                if windowed:
                    before_window += 1
                else:
                    gaps += 1
            if any(b < a for a, b in itertools.pairwise(seq)):
                out_of_order += 1
        result = {
            "allocations": len(in_scope),
            "scanned": scanned,
            "gaps": gaps,
            "out_of_order": out_of_order,
            "first_seq": first,
            "last_seq": last_seq,
            **counts,
        }
        if windowed:
            result["activated_before_window"] = before_window
        # Judged on what was read: a read cut short by the timeout says how far it got, and is no "ok".
        status = "warn" if gaps or out_of_order or not complete else "ok"
        truncated = (
            f" (the newest {SCAN_LIMIT} events, {first}-{last_seq}; {before_window} allocations activated before"
            " them: their activation is not checked)"
            if windowed
            else ""
        )
        if not complete:
            truncated += f" (only {scanned} of {last_seq - first + 1} events arrived within {SCAN_TIMEOUT} s)"
        return CheckResult(
            check="event_sequence",
            status=status,
            headline=f"{len(in_scope)} allocations, {counts['events']} events, {gaps} gaps, "
            f"{out_of_order} out of order{truncated}",
            counts=result,
        )

    @staticmethod
    def _collect(
        ref: RunRef,
        subject: str,
        event: dict[str, Any],
        by_alloc: dict[str, list[str]],
        in_scope: set[str],
        counts: dict[str, int],
    ) -> None:
        alloc = event.get("allocation_id")
        scope = ref.scope
        if subject.startswith("payments."):
            if scope.org_id is None or event.get("org_id") in (None, scope.org_id):
                counts["payments"] += 1
            return
        if not isinstance(alloc, str):
            return
        if subject == "provisioning.active" and (
            (scope.allocation_id is None or alloc == scope.allocation_id)
            and (scope.org_id is None or event.get("org_id") == scope.org_id)
        ):
            in_scope.add(alloc)
        if scope.is_global or alloc in in_scope or alloc == scope.allocation_id:
            in_scope.add(alloc)
            by_alloc.setdefault(alloc, []).append(subject)
            counts["events"] += 1
            if subject.startswith("billing."):
                counts["billing"] += 1

    @activity.defn(name=names.PUBLISH_ESCALATION)
    async def publish_escalation(self, request: EscalationRequest) -> None:
        """Publish `remediation.escalations` with the plan summary and the next approver tier."""
        js = (await self._client()).jetstream()
        body = {
            "workflow_id": request.ref.workflow_id,
            "correlation_id": request.ref.correlation_id,
            "plan_id": request.plan_id,
            "plan_hash": request.plan_hash,
            "action_count": request.action_count,
            "money_moved_minor": request.money_moved_minor,
            "next_tier": request.next_tier,
            "next_approvers": request.next_approvers,
        }
        try:
            await js.publish(
                "remediation.escalations",
                json.dumps(body).encode(),
                headers={"Nats-Msg-Id": f"{request.plan_id}:tier{request.next_tier}"},
            )
        except (NatsError, TimeoutError) as exc:
            raise dependency_down(f"NATS publish failed: {type(exc).__name__}") from exc


async def _quiet(exc: Exception) -> None:
    # Connection errors surface through the activity's own error; don't spam the worker log.
    del exc


def _decode(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
