"""Activities on the remediation's own records: runs, timeline, approvals audit, snapshots, evidence."""

from __future__ import annotations

import json

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from temporalio import activity

from activities.errors import bad_input
from activities.postgres.base import PostgresActivities, driver_errors
from activities.postgres.evidence_document import build_evidence
from activities.scope_sql import LEDGER_COLUMNS, USAGE_COLUMNS, scope_predicate
from contracts import names
from contracts.models import (
    ApiActionAudit,
    ApprovalRecord,
    DriftKind,
    EvidenceRequest,
    FinishRun,
    RegisterRun,
    SnapshotRequest,
    TimelineEvent,
)
from database.approvals import record_approval_row
from database.audit_chain import chain_head, seal_run, sign_integrity
from database.scope import ScopeRefused, validate_scope
from database.timeline import insert_timeline


class RecordsActivities(PostgresActivities):
    """The remediation's audit trail in Postgres."""

    def __init__(self, pool: asyncpg.Pool, signer: Ed25519PrivateKey | None = None) -> None:
        super().__init__(pool)
        self._signer = signer

    @activity.defn(name=names.REGISTER_RUN)
    async def register_run(self, request: RegisterRun) -> None:
        """Validate the scope against the billing data and record the run (idempotent)."""
        ref = request.ref
        with driver_errors():
            try:
                await validate_scope(self._pool, ref.scope)
            except ScopeRefused as err:
                raise bad_input(str(err)) from None
            await self._execute(
                """INSERT INTO remediation.runs (run_id, workflow_id, correlation_id, trace_id, trigger, scope,
                       requested_by, dry_run) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT (run_id) DO NOTHING""",
                ref.run_id,
                ref.workflow_id,
                ref.correlation_id,
                ref.trace_id,
                request.request.trigger.value,
                ref.scope.model_dump_json(),
                request.request.requested_by,
                request.request.dry_run,
            )
            await insert_timeline(
                self._pool,
                run_id=ref.run_id,
                phase="started",
                actor=request.request.requested_by,
                message=f"remediation started for {ref.scope.describe()} "
                f"(trigger {request.request.trigger.value}"
                f"{', dry run' if request.request.dry_run else ''})",
                event_key=f"{ref.run_id}:start",
                detail={"correlation_id": ref.correlation_id, "trace_id": ref.trace_id},
            )

    @activity.defn(name=names.RECORD_TIMELINE)
    async def record_timeline(self, event: TimelineEvent) -> None:
        """Append one timeline event (idempotent per event key)."""
        with driver_errors():
            await insert_timeline(
                self._pool,
                run_id=event.run_id,
                phase=event.phase,
                actor=event.actor,
                message=event.message,
                event_key=event.event_key,
                detail=dict(event.detail),
            )

    @activity.defn(name=names.RECORD_APPROVAL)
    async def record_approval(self, record: ApprovalRecord) -> None:
        """Audit an approval attempt."""
        with driver_errors():
            await record_approval_row(self._pool, record)

    @activity.defn(name=names.RECORD_API_ACTION)
    async def record_api_action(self, audit: ApiActionAudit) -> None:
        """Audit an admin-API plan action (restriction clear, worker restart) with the outcome the API gave."""
        request, action = audit.request, audit.request.action
        await self._execute(
            """INSERT INTO remediation.applied_actions (plan_id, seq, idempotency_key, kind, outcome, actor, approvers,
                   workflow_id, correlation_id, before, after)
               VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,'{}',$10) ON CONFLICT (plan_id, seq) DO NOTHING""",
            request.plan_id,
            action.seq,
            action.idempotency_key,
            action.kind,
            audit.result.outcome,
            request.actor,
            request.approvers,
            request.ref.workflow_id,
            request.ref.correlation_id,
            json.dumps({"detail": audit.result.detail}),
        )

    @activity.defn(name=names.SNAPSHOT_SCOPE)
    async def snapshot_scope(self, request: SnapshotRequest) -> None:
        """Query evidence for usage_records and ledger_entries in scope (counts and sums)."""
        ref = request.ref
        usage_pred, uparams = scope_predicate(ref.scope, USAGE_COLUMNS, 1)
        ledger_pred, lparams = scope_predicate(ref.scope, LEDGER_COLUMNS, 1)
        usage = await self._fetchrow(
            f"""SELECT count(*) AS records, count(*) FILTER (WHERE end_time IS NULL) AS open_records,
                       coalesce(sum(accrued_cost_minor), 0) AS accrued_minor
                FROM billing.usage_records u WHERE {usage_pred}""",
            *uparams,
        )
        ledger = await self._fetch(
            f"""SELECT kind, count(*) AS entries, coalesce(sum(amount_minor), 0) AS total_minor
                FROM billing.ledger_entries l WHERE {ledger_pred} GROUP BY kind ORDER BY kind""",
            *lparams,
        )
        # Exactly the pass the workflow names, every kind listed: a pass that found nothing has no
        # finding rows, and reading "the latest pass with rows" instead showed "after" = "before".
        drift = await self._fetch(
            """SELECT k.kind, count(f.kind) AS n FROM unnest($3::text[]) AS k(kind)
               LEFT JOIN remediation.findings f ON f.run_id = $1 AND f.pass = $2 AND f.kind = k.kind
               GROUP BY k.kind ORDER BY k.kind""",
            ref.run_id,
            request.pass_no,
            [kind.value for kind in DriftKind],
        )
        data = {
            "usage_records": {k: int(v) for k, v in dict(usage).items()},
            "ledger_entries": {
                r["kind"]: {"entries": int(r["entries"]), "total_minor": int(r["total_minor"])}
                for r in ledger
            },
            "drift": {r["kind"]: int(r["n"]) for r in drift},
            "queries": {
                "usage_records": f"SELECT count(*), count(*) FILTER (WHERE end_time IS NULL), sum(accrued_cost_minor)"
                f" FROM billing.usage_records u WHERE {usage_pred}",
                "ledger_entries": f"SELECT kind, count(*), sum(amount_minor) FROM billing.ledger_entries l"
                f" WHERE {ledger_pred} GROUP BY kind",
                "params": uparams,
            },
        }
        await self._execute(
            """INSERT INTO remediation.snapshots (run_id, label, data) VALUES ($1, $2, $3)
               ON CONFLICT (run_id, label) DO UPDATE SET data = excluded.data, taken_at = now()""",
            ref.run_id,
            request.label,
            json.dumps(data),
        )

    @activity.defn(name=names.CAPTURE_EVIDENCE)
    async def capture_evidence(self, request: EvidenceRequest) -> None:
        """Assemble the runbook's evidence pack and store it with the run."""
        run_id = request.ref.run_id
        with driver_errors():
            # Through JSON once, so the digest is of exactly what is stored and later read back.
            document = json.loads(json.dumps(await build_evidence(self._pool, request), default=str))
            length, head = await chain_head(self._pool, run_id)
        document["integrity"] = sign_integrity(self._signer, run_id, length, head, document)
        await self._execute(
            """INSERT INTO remediation.evidence (run_id, document) VALUES ($1, $2)
               ON CONFLICT (run_id) DO UPDATE SET document = excluded.document, created_at = now()""",
            request.ref.run_id,
            json.dumps(document, default=str),
        )

    @activity.defn(name=names.FINISH_RUN)
    async def finish_run(self, request: FinishRun) -> None:
        """Close the run with its outcome."""
        await self._execute(
            """UPDATE remediation.runs SET phase = $2, outcome = $3, blast_radius = $4, ended_at = now()
               WHERE run_id = $1""",
            request.ref.run_id,
            request.phase,
            request.outcome,
            request.blast_radius,
        )
        await self._timeline(
            request.ref.run_id, "finish", request.phase, f"remediation ended: {request.outcome}", {}
        )
        # The closing entry is the run's last legitimate row: the seal covers it and nothing after.
        with driver_errors():
            await seal_run(self._pool, request.ref.run_id, self._signer)
