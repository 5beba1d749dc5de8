"""Pydantic models at every workflow and activity boundary (pydantic and the standard library only).

No field defaults to a clock or a random value: models are built inside the workflow sandbox.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"
TRACE_ID_PATTERN = r"^[0-9a-fA-F]{1,32}$"
PLAN_HASH_PATTERN = r"^[0-9a-f]{64}$"
EntityId = Annotated[str, StringConstraints(pattern=ID_PATTERN, strip_whitespace=True)]
TraceId = Annotated[str, StringConstraints(pattern=TRACE_ID_PATTERN, strip_whitespace=True)]


# Actions per apply batch: apply advances by ranges of this size (0 would never advance).
BatchSize = Annotated[int, Field(ge=1, le=10_000)]


class Frozen(BaseModel):
    """Base: immutable, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class Trigger(StrEnum):
    """Why the remediation was started (the runbook's triggers)."""

    WORKER_FAILURE = "worker_failure"
    QUEUE_LAG = "queue_lag"
    RECONCILE_FAILED = "reconcile_failed"
    CUSTOMER_DISPUTE = "customer_dispute"
    PREPAID_DEPLETED = "prepaid_depleted"
    MANUAL = "manual"
    DRIFT_DETECTED = "drift_detected"  # the drift watch found it (no alert, no customer yet)
    REVERSAL = "reversal"  # take back what an earlier run applied (``RemediationRequest.reverses``)


class Phase(StrEnum):
    """Where a remediation is; upserted as the RemediationPhase search attribute."""

    STARTED = "started"
    DIAGNOSING = "diagnosing"
    FREEZING = "freezing"
    RECONCILING = "reconciling"
    WAITING_ON_PROVIDER = "waiting_on_provider"
    AWAITING_APPROVAL = "awaiting_approval"
    REMEDIATING = "remediating"
    VERIFYING = "verifying"
    AWAITING_DECISION = "awaiting_decision"
    CAPTURING_EVIDENCE = "capturing_evidence"
    COMPLETED = "completed"
    DRY_RUN_COMPLETE = "dry_run_complete"
    REJECTED = "rejected"
    HANDED_OFF = "handed_off"
    EXPIRED = "expired"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        """True for the phases a run ends in."""
        return self in _ENDED


_ENDED = frozenset(
    {
        Phase.COMPLETED,
        Phase.DRY_RUN_COMPLETE,
        Phase.REJECTED,
        Phase.HANDED_OFF,
        Phase.EXPIRED,
        Phase.FAILED,
        Phase.CANCELLED,
    }
)


class ActionKind(StrEnum):
    """Every kind of plan action: the plan's SQL, the apply handlers and the workflow name them from here."""

    OPEN_USAGE_RECORD = "open_usage_record"
    CLOSE_ORPHAN_USAGE = "close_orphan_usage"
    POST_USAGE_DEBIT = "post_usage_debit"
    CREDIT_PAYMENT = "credit_payment"
    LINK_PAYMENT_CREDIT = "link_payment_credit"
    # The provider says the payment was never captured: the session is marked failed, no credit.
    MARK_PAYMENT_FAILED = "mark_payment_failed"
    # The provider disagrees (amount, currency, refund, dispute, unknown id): no money moves, ever;
    # listed in the plan and the evidence's follow-ups for the payments team.
    INVESTIGATE_PAYMENT = "investigate_payment"
    # Carried out through the admin billing API by the workflow, not in Postgres.
    CLEAR_FINANCIAL_RESTRICTION = "clear_financial_restriction"
    RESTART_BILLING_WORKER = "restart_billing_worker"
    # A runtime regression of the current revision: run the previous one (a restart reruns the bad code).
    ROLLBACK_BILLING_WORKER = "rollback_billing_worker"
    # A reversal's actions: post the exact inverse of a ledger entry; put a row back to its audited
    # ``before`` (only while it still holds the run's ``after``); name what cannot be taken back.
    REVERSE_LEDGER_ENTRY = "reverse_ledger_entry"
    RESTORE_ROW = "restore_row"
    NOT_REVERSIBLE = "not_reversible"


REVERSAL_KINDS = (ActionKind.REVERSE_LEDGER_ENTRY, ActionKind.RESTORE_ROW, ActionKind.NOT_REVERSIBLE)
# Kinds that change nothing when applied: they hand a case to a human (no approval needed for them alone).
FOLLOW_UP_KINDS = (ActionKind.INVESTIGATE_PAYMENT, ActionKind.NOT_REVERSIBLE)

API_ACTION_KINDS = (
    ActionKind.CLEAR_FINANCIAL_RESTRICTION,
    ActionKind.RESTART_BILLING_WORKER,
    ActionKind.ROLLBACK_BILLING_WORKER,
)
# Checked against the payment provider again at apply time, in case it changed its answer since approval.
PROVIDER_CHECKED_KINDS = (ActionKind.CREDIT_PAYMENT, ActionKind.MARK_PAYMENT_FAILED)


class PaymentVerdict(StrEnum):
    """What the payment provider's answer means for one payment session."""

    CAPTURED = "captured"  # captured, same amount and currency, no refund or dispute: credit
    NOT_CAPTURED = "not_captured"  # never captured: mark the session failed, no credit
    INVESTIGATE = "investigate"  # amount/currency differs, refunded, disputed, unknown id: no money moves
    UNREACHABLE = "unreachable"  # no answer: no plan for the session until it answers


class ProviderPayment(Frozen):
    """The provider's own figures for one payment (integer minor units, lower-case ISO currency)."""

    ref: str
    found: bool
    status: str | None = None
    amount_minor: int | None = None
    captured_minor: int = 0
    currency: str | None = None
    refunded_minor: int = 0
    disputed: bool = False


class PaymentCheck(Frozen):
    """The verdict on one payment finding, kept in the finding's detail and the plan's hash."""

    verdict: PaymentVerdict
    reason: str
    payment: ProviderPayment | None = None
    # Whether the provider's success event reached the platform's webhook worker (its Loki lines).
    webhook: str = "unknown"


class PaymentCheckSummary(Frozen):
    """Verdicts written for one reconciliation pass's payment findings."""

    checked: int = 0
    verdicts: dict[str, int] = Field(default_factory=dict)
    unreachable_reason: str | None = None

    @property
    def unreachable(self) -> int:
        """Sessions the provider did not answer for."""
        return self.verdicts.get(PaymentVerdict.UNREACHABLE.value, 0)


def sql_list(values: Iterable[str]) -> str:
    """``('a', 'b')`` for an SQL ``IN`` (the values are the code's constants, never input)."""
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


class BlastRadius(StrEnum):
    """Single user/project dispute, one org, or a widespread (global worker) degradation."""

    SINGLE = "single"
    ORG = "org"
    WIDESPREAD = "widespread"


class DriftKind(StrEnum):
    """The runbook's four reconciliation checks."""

    MISSING_OPEN_USAGE = "missing_open_usage"
    ORPHAN_OPEN_USAGE = "orphan_open_usage"
    UNBILLED_CLOSED_USAGE = "unbilled_closed_usage"
    PAYMENT_DRIFT = "payment_drift"


# A finding beside the four runbook checks: a payment a remediation credited that the provider has since
# refunded or disputed. Its plan row is the reversal of that one credit.
CREDIT_REVOKED = "credit_revoked_at_provider"
# How far back credits posted by remediations are re-checked at the provider (card disputes: ~120 days).
CREDIT_RECHECK_DAYS = 180


class Scope(Frozen):
    """What the remediation may look at and change; empty means the whole platform."""

    org_id: EntityId | None = None
    project_id: EntityId | None = None
    user_id: EntityId | None = None
    allocation_id: EntityId | None = None
    app_instance_id: EntityId | None = None
    usage_source: EntityId | None = None
    control_plane_component: EntityId | None = None

    @property
    def is_global(self) -> bool:
        """True when no identifier narrows the scope."""
        return not any(self.model_dump().values())

    def key(self) -> str:
        """Canonical, stable text for ids and locks: ``org:o1/user:u1`` or ``global``."""
        parts = [f"{name.removesuffix('_id')}:{value}" for name, value in self.model_dump().items() if value]
        return "/".join(parts) or "global"

    def describe(self) -> str:
        """Human words for summaries."""
        return (
            ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.model_dump().items() if v) or "all orgs"
        )


class ReversalTarget(Frozen):
    """What a reversal takes back: the applied actions of one run (all of them, or the request's scope)."""

    workflow_id: Annotated[str, StringConstraints(pattern=r"^remediation-[A-Za-z0-9._:/\-]{1,200}$")]
    run_id: EntityId
    reason: Annotated[str, StringConstraints(min_length=3, max_length=500, strip_whitespace=True)]


class RemediationRequest(Frozen):
    """What an incident commander starts."""

    correlation_id: Annotated[str, StringConstraints(pattern=ID_PATTERN, strip_whitespace=True)]
    trace_id: TraceId | None = None
    scope: Scope = Field(default_factory=Scope)
    trigger: Trigger = Trigger.MANUAL
    dry_run: bool = False
    requested_by: EntityId
    reverses: ReversalTarget | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RemediationRequest:
        if self.trigger is Trigger.PREPAID_DEPLETED and self.scope.org_id is None:
            raise ValueError("scope.org_id: a prepaid_depleted remediation needs the org it concerns")
        if (self.trigger is Trigger.REVERSAL) != (self.reverses is not None):
            raise ValueError("reverses: a reversal names the run it reverses, and only a reversal does")
        if self.reverses is not None and any(
            getattr(self.scope, field)
            for field in ("app_instance_id", "usage_source", "control_plane_component")
        ):
            raise ValueError("scope: a reversal is scoped by org, project, user or allocation only")
        return self

    def workflow_id(self) -> str:
        """Derived from the scope so that a second start for the same data attaches to the running one.

        A reversal's id names the run it reverses (and its scope): one reversal of a run at a time.
        """
        key = re.sub(r"[^A-Za-z0-9._:/-]", "_", self.scope.key())
        if self.reverses is not None:
            return f"remediation-reversal-{self.reverses.run_id}" + (
                "" if self.scope.is_global else f"-{key}"
            )
        return "remediation-" + key


# --- configuration handed to the workflow -------------------------------------------------------------


class ApproverInfo(Frozen):
    """A configured approver (public key only; private keys never leave the approver's machine)."""

    name: str
    role: str
    tier: int = 1
    public_key: str | None = None


class ApprovalPolicy(Frozen):
    """Who may approve, how many are needed and how long to wait."""

    approvers: list[ApproverInfo]
    quorum: int
    money_threshold_minor: int
    deadline_seconds: int
    hard_limit_seconds: int
    require_signatures: bool = False
    # Plans with more actions than this need the quorum too (None: only money and breadth count).
    rows_threshold: int | None = None

    def approver(self, name: str) -> ApproverInfo | None:
        """The approver called ``name``, if configured."""
        return next((a for a in self.approvers if a.name == name), None)


class RuntimeOptions(Frozen):
    """Worker-side knobs the workflow needs (read by an activity so they land in history once)."""

    policy: ApprovalPolicy
    verify_window_seconds: int
    widespread_org_threshold: int
    apply_batch_size: BatchSize
    activity_timeout_seconds: int = 60
    heartbeat_seconds: int = 30
    retry_max_interval_seconds: int = 30
    provider_wait_seconds: int = 30
    consumer_pending_threshold: int = 100
    alert_resolved_wait_seconds: int = 120
    # The billing worker's hooks as plans sign them (``hook_words``; no credentials).
    restart_hook: str = ""
    rollback_hook: str = ""
    # The approval page as approvers' browsers reach it (pages link to ``<url>/runs/<workflow id>``).
    approval_page_url: str = ""
    # A platform-wide plan may start from the drift watch's state (PLAN_FROM_WATCH).
    plan_from_watch: bool = False


# --- activity inputs and results ---------------------------------------------------------------------


class RunRef(Frozen):
    """Identifies one remediation run in the project's Postgres records."""

    run_id: str
    workflow_id: str
    correlation_id: str
    trace_id: str | None = None
    scope: Scope = Field(default_factory=Scope)


class RegisterRun(Frozen):
    """Input of `register_run`."""

    ref: RunRef
    request: RemediationRequest


class TimelineEvent(Frozen):
    """One line of the incident timeline (idempotent per ``event_key``)."""

    run_id: str
    event_key: str
    phase: str
    actor: str
    message: str
    detail: dict[str, str | int | bool | None] = Field(default_factory=dict)


CheckStatus = Literal["ok", "warn", "critical", "unreachable", "skipped"]


class CheckResult(Frozen):
    """A diagnosis check: status, one-line headline, a few numbers; details stay in Postgres."""

    check: str
    status: CheckStatus
    headline: str
    counts: dict[str, int] = Field(default_factory=dict)
    trace_ids: list[str] = Field(default_factory=list)


class BlastRadiusResult(Frozen):
    """The blast radius and the numbers it was judged on."""

    radius: BlastRadius
    # None: not counted here (a platform-wide run counts its drift in the reconciliation).
    drift_in_scope: int | None
    # From the platform summary; None when none is recent enough (a scoped run never scans the platform).
    orgs_with_drift: int | None
    reasons: list[str]
    platform_summary_age_s: int | None = None
    # Degradation outside a scoped run's scope (a named finding, not a reason to widen the run's risk).
    platform_degradation: CheckResult | None = None


class BlastRadiusRequest(Frozen):
    """Input of `assess_blast_radius`."""

    ref: RunRef
    worker_degraded: bool
    widespread_org_threshold: int


class LeftEntity(Frozen):
    """A record verification still found drifted, and what the run's plan did about it."""

    kind: str  # the drift kind (DriftKind)
    entity_type: str
    entity_id: str
    org_id: str
    amount_minor: int = 0
    currency: str | None = None
    plan_id: str | None = None  # the plan action meant to fix it (None: not in any plan of the run)
    seq: int | None = None
    action: str | None = None
    outcome: str | None = None  # its audited outcome (None: not applied)
    reason: str | None = None  # why it was not applied, as audited

    def describe(self) -> str:
        """One line: the record, then the plan action and its skip reason."""
        what = f"{self.kind} {self.entity_type} {self.entity_id} (org {self.org_id}"
        what += f", {format_money(self.amount_minor, self.currency)})" if self.amount_minor else ")"
        if self.seq is None:
            return f"{what}: in no plan of this run (appeared after planning)"
        done = f"{self.outcome}: {self.reason}" if self.reason else (self.outcome or "not applied")
        return f"{what}: plan {self.plan_id} action #{self.seq} {self.action} {done}"


LEFT_NAMED = 20  # entities a failed criterion names; beyond that, counts


class ReconcileRequest(Frozen):
    """Input of `reconcile`: which pass (0 = before, 100+ = verification passes), which checks.

    A pass may be split: the payment check first (``completes_pass=False``: its findings only), so the
    provider is asked while the other checks run; the call with ``completes_pass`` then reports the
    whole pass (every kind's findings, the timeline entry, follow-ups, the platform summary).
    """

    ref: RunRef
    pass_no: int
    kinds: list[DriftKind] | None = None  # None: all four
    completes_pass: bool = True
    # Verification passes: name up to this many findings left, each with the run's plan action for it.
    name_left: int = 0
    # A platform-wide pass before the plan may read the drift watch's state instead of every row
    # (when a watch is keeping up); the pass records which source it used.
    from_watch: bool = False
    # Why the workflow did not let it (the outbox relay behind, the watch unable to catch up), for the plan.
    from_watch_refused: str = ""


class ReconcileSummary(Frozen):
    """Counts of drift by kind for one reconciliation pass."""

    pass_no: int
    counts: dict[str, int]
    total: int
    # Findings this run already handed to a human (investigate_payment): expected to remain.
    follow_ups: int = 0
    # The orgs of those follow-ups (their PaymentsReconcileFailed alerts may keep firing, handed over).
    follow_up_orgs: list[str] = Field(default_factory=list)
    # With ``name_left``: the findings left (follow-ups excluded), each with its plan action and outcome.
    left: list[LeftEntity] = Field(default_factory=list)
    # Where the findings came from: a full reconciliation, or the drift watch's state and its age.
    source: str = ""


class PlanRequest(Frozen):
    """Input of `build_plan`."""

    ref: RunRef
    pass_no: int
    plan_id: str
    restart_worker: bool
    # Set when diagnosis suspects a runtime regression: roll back to this revision instead of restarting.
    rollback_worker_to: int | None = None
    rollback_worker_from: int | None = None
    # The hook the worker action will call (``hook_words``): in the plan's hash, so approvers sign it.
    worker_hook: str | None = None
    # Read only the first customers' balances with the plan; the workflow reads the rest (read_plan_balances)
    # while the plan waits for approval. False on runs from before that: every balance with the plan.
    balances_later: bool = False


class PlanBalancesRequest(Frozen):
    """Input of `read_plan_balances`: the balances a plan built with ``balances_later`` left to read."""

    ref: RunRef
    plan_id: str


class ReversalPlanRequest(Frozen):
    """Input of `build_reversal_plan`: the inverse of what ``target``'s run applied, within ``ref.scope``."""

    ref: RunRef
    plan_id: str
    target: ReversalTarget


class ReversalVerifyRequest(Frozen):
    """Input of `verify_reversal`."""

    ref: RunRef
    plan_id: str


class ApiAction(Frozen):
    """A plan action carried out through the admin billing API rather than Postgres."""

    seq: int
    kind: Literal[
        ActionKind.CLEAR_FINANCIAL_RESTRICTION,
        ActionKind.RESTART_BILLING_WORKER,
        ActionKind.ROLLBACK_BILLING_WORKER,
    ]
    org_id: str
    idempotency_key: str
    # The revision a rollback runs.
    target_revision: int | None = None
    # Signed with the plan: the revision a rollback replaces and the hook a worker action calls.
    from_revision: int | None = None
    hook: str | None = None


def format_money(minor: int, currency: str | None = None) -> str:
    """Integer minor units as an amount with two decimals (no float) and its currency: ``-380.62 USD``."""
    sign = "-" if minor < 0 else ""
    whole, cents = divmod(abs(int(minor)), 100)
    return f"{sign}{whole:,}.{cents:02d}" + (f" {currency}" if currency else "")


# The stand-in's (and the platform's) worker hooks when none is configured.
RESTART_HOOK_PATH = "/api/v1/admin/billing-worker/restart"
ROLLBACK_HOOK_PATH = "/api/v1/admin/billing-worker/rollback"


def hook_words(url: str | None, default_path: str) -> str:
    """A worker hook as approvers read and sign it: ``POST <url>`` without credentials or query."""
    target = url or default_path
    scheme, sep, rest = target.partition("://")
    if sep:
        host, slash, path = rest.partition("/")
        target = f"{scheme}://{host.rpartition('@')[2]}{slash}{path}"
    return "POST " + target.split("?", 1)[0]


def action_effect(kind: str, params: dict[str, object] | None) -> str:
    """What an admin-API plan action will do, in words (CLI, approval page, evidence)."""
    params = params or {}
    hook = f" via {params['hook']}" if params.get("hook") else ""
    if kind == ActionKind.ROLLBACK_BILLING_WORKER.value:
        return f"revision {params.get('from_revision', '?')} -> {params.get('to_revision', '?')}{hook}"
    if kind == ActionKind.RESTART_BILLING_WORKER.value:
        return f"restart{hook}"
    return ""


class WorkerRevision(Frozen):
    """One deployed revision of the platform's billing worker."""

    revision: int
    version: str
    rolled_out_at: datetime
    rolled_back_at: datetime | None = None


class WorkerDeployments(Frozen):
    """The billing worker's current revision and the one deployed before it."""

    current: WorkerRevision
    previous: WorkerRevision | None = None


class PlanSummary(Frozen):
    """A remediation plan's identity, content hash and totals (its actions stay in Postgres)."""

    plan_id: str
    plan_hash: str
    action_count: int
    debit_total_minor: int
    credit_total_minor: int
    counts_by_kind: dict[str, int]
    api_actions: list[ApiAction] = Field(default_factory=list)
    # A reversal's plan names the run it takes back (its requester may never approve it).
    reverses_run_id: str | None = None
    # Where the plan's findings came from (a full reconciliation, or the drift watch's state and its age).
    findings_from: str = ""

    @property
    def empty(self) -> bool:
        """True when there is nothing to change (follow-ups for a human change nothing: no approval)."""
        return self.action_count == sum(self.counts_by_kind.get(k.value, 0) for k in FOLLOW_UP_KINDS)

    @property
    def money_moved_minor(self) -> int:
        """Absolute money the plan moves (debits plus credits)."""
        return abs(self.debit_total_minor) + abs(self.credit_total_minor)


class ApplyRequest(Frozen):
    """Input of `apply_plan`."""

    ref: RunRef
    plan_id: str
    plan_hash: str
    actor: str
    approvers: list[str]
    batch_size: BatchSize


class ApplyOutcome(StrEnum):
    """An approved action's audited outcome (``remediation.applied_actions.outcome``)."""

    APPLIED = "applied"
    # Not written, with the reason in the audit row's ``after.skipped``:
    ALREADY_APPLIED = "already_applied"  # the platform did it first (which entry or state, who wrote it)
    SKIPPED_STALE = "skipped_stale"  # changed since planning (planned -> now)
    SKIPPED_GONE = "skipped_gone"  # the entity no longer exists
    SKIPPED_PROVIDER = "skipped_provider"  # the provider's answer changed since approval
    FOLLOW_UP = "follow_up"  # handed to the payments team, never applied


class ApplySummary(Frozen):
    """What applying a plan did."""

    applied: int
    skipped_stale: int
    already_applied: int
    last_seq: int
    # Provider-checked actions whose provider answer changed since approval (nothing done, audited).
    skipped_provider: int = 0
    # investigate_payment actions: handed to the payments team, never applied.
    follow_ups: int = 0
    skipped_gone: int = 0

    def describe(self) -> str:
        """The apply in one line, every outcome counted (what the timeline and the CLI say)."""
        return (
            f"applied {self.applied} actions; {self.already_applied} already done by the platform, "
            f"{self.skipped_stale} changed since planning, {self.skipped_gone} gone, "
            f"{self.skipped_provider} refused by the provider's answer, {self.follow_ups} follow-ups"
        )


class ApiActionRequest(Frozen):
    """Input of the admin-API actions and of their audit record."""

    ref: RunRef
    plan_id: str
    action: ApiAction
    actor: str
    approvers: list[str]


class ApiActionResult(Frozen):
    """Outcome of one admin-API action."""

    outcome: Literal["applied", "skipped_stale", "already_applied"]
    detail: str


class ApiActionAudit(Frozen):
    """Input of `record_api_action`: what was asked and what the admin API did."""

    request: ApiActionRequest
    result: ApiActionResult


class FreezeRequest(Frozen):
    """Freeze or lift manual adjustments for a scope."""

    ref: RunRef
    freeze_id: str
    actor: str
    reason: str


class SnapshotRequest(Frozen):
    """Capture query evidence for the scope under ``label`` (before/after)."""

    ref: RunRef
    label: Literal["before", "after"]
    # The reconciliation pass whose findings are the drift to record (0 before; the verification pass after).
    pass_no: int = 0


class Criterion(Frozen):
    """One recovery criterion and whether it holds."""

    name: str
    passed: bool
    detail: str
    # When it failed on records still drifted: the first LEFT_NAMED of them, each tied to its plan action.
    left: list[LeftEntity] = Field(default_factory=list)


class ConsumerSample(Frozen):
    """One reading of the billing worker consumer."""

    pending: int
    ack_pending: int
    # Stream sequence below which every message is acknowledged: it advances only when work completes.
    ack_floor: int = 0
    # Stream sequence of the newest message queued for the consumer (0: unknown or none).
    backlog_head: int = 0
    redelivered: int
    seconds_since_active: int | None
    status: CheckStatus

    @classmethod
    def of(cls, result: CheckResult) -> ConsumerSample | None:
        """The sample a `check_consumer` result carries (None when the consumer was not measured)."""
        if "pending" not in result.counts:
            return None
        counts = result.counts
        return cls(
            pending=counts.get("pending", 0),
            ack_pending=counts.get("ack_pending", 0),
            ack_floor=counts.get("ack_floor", 0),
            backlog_head=counts.get("backlog_head", 0),
            redelivered=counts.get("redelivered", 0),
            seconds_since_active=counts.get("seconds_since_active"),
            status=result.status,
        )


class VerificationRequest(Frozen):
    """Input of the Postgres-side verification."""

    ref: RunRef
    pass_no: int


class AlertNotice(Frozen):
    """An alert (or platform event) about a remediation's scope, recorded on the run."""

    source: Literal["alertmanager", "nats", "drift-watch"]
    name: Annotated[str, StringConstraints(max_length=200)]
    status: Literal["firing", "resolved"]
    fingerprint: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    correlation_id: str | None = None
    summary: Annotated[str, StringConstraints(max_length=300)] = ""

    def key(self) -> str:
        """One record per alert and status, however often it repeats."""
        return f"{self.source}:{self.fingerprint}:{self.status}"


class AlertCheckRequest(Frozen):
    """Input of `alertmanager.check_alerts`: the run, and the alerts it recorded firing (by fingerprint)."""

    ref: RunRef
    recorded_firing: list[str] = Field(default_factory=list)
    # Orgs whose failed payments this run handed to the payments team (investigate follow-ups).
    handed_over_orgs: list[str] = Field(default_factory=list)


class AlertCheckResult(Frozen):
    """Recovery criterion 4 from Alertmanager, and which recorded alerts it no longer has active
    (their "resolved" notification is on its way)."""

    criterion: Criterion
    firing: list[str] = Field(default_factory=list)
    handed_over: list[str] = Field(default_factory=list)
    resolved_in_alertmanager: list[str] = Field(default_factory=list)


class LaunchGuardVerifyRequest(Frozen):
    """What `remediate verify-launch-guard` (or a prepaid remediation's verification) asks for."""

    org_id: EntityId
    project_id: EntityId | None = None
    correlation_id: Annotated[str, StringConstraints(pattern=ID_PATTERN, strip_whitespace=True)]
    expect: Literal["restricted", "recovered"] = "restricted"
    sku: EntityId = "compute-vm-small"
    # Submitting a launch is only a safe probe while launches are expected to be refused (402).
    probe_submit: bool = True
    requested_by: EntityId

    def probe(self) -> LaunchProbe:
        """The activities' input."""
        return LaunchProbe(
            correlation_id=self.correlation_id, org_id=self.org_id, project_id=self.project_id, sku=self.sku
        )


class LaunchProbe(Frozen):
    """Input of the posture, precheck and submit probes."""

    correlation_id: str
    org_id: str
    project_id: str | None = None
    sku: str = "compute-vm-small"


class PostureObservation(Frozen):
    """GET /api/v1/billing/financial-posture, the fields the runbook compares."""

    org_id: str
    state: str
    reason: str | None = None
    block_new_launches: bool
    balance_minor: int | None = None


class PrecheckObservation(Frozen):
    """The `billing` check of POST /api/v1/v3/launch/compute/precheck."""

    sku: str
    billing_severity: str | None
    billing_reason: str | None = None


class SubmitObservation(Frozen):
    """What POST /api/v1/v3/launch/compute answered."""

    status_code: int
    code: str | None = None


class LaunchGuardReport(Frozen):
    """The verdict of one launch-restriction verification."""

    expect: Literal["restricted", "recovered"]
    passed: bool
    criteria: list[Criterion]
    posture: PostureObservation
    precheck: PrecheckObservation
    submit: SubmitObservation | None = None


class VerificationResult(Frozen):
    """The verdict on the runbook's recovery criteria."""

    passed: bool
    criteria: list[Criterion]


class ApprovalDecision(Frozen):
    """An approver's answer, sent as an Update (preferred) or a signal."""

    plan_hash: Annotated[str, StringConstraints(pattern=PLAN_HASH_PATTERN)]
    approver: EntityId
    decision: Literal["approve", "reject"]
    comment: Annotated[str, StringConstraints(max_length=2000)] = ""
    plan_id: Annotated[str, StringConstraints(max_length=200)] | None = None
    signed_at: Annotated[str, StringConstraints(max_length=64)] | None = None
    signature: Annotated[str, StringConstraints(max_length=200)] | None = None
    # Where the decision was made (set by the client that forwards it; not part of what is signed).
    client: Literal["cli", "approval_page"] | None = None


class ApprovalRecord(Frozen):
    """An approval attempt to audit (accepted or refused)."""

    run_id: str
    event_key: str
    plan_id: str | None
    plan_hash: str | None
    approver: str
    decision: str
    comment: str
    accepted: bool
    refusal_reason: str | None
    via: str

    @classmethod
    def of(
        cls,
        decision: ApprovalDecision,
        *,
        run_id: str,
        event_key: str,
        plan_id: str | None,
        refusal_reason: str | None,
        via: str,
    ) -> ApprovalRecord:
        """The audit record of ``decision``; accepted when there is no refusal reason."""
        return cls(
            run_id=run_id,
            event_key=event_key,
            plan_id=plan_id,
            plan_hash=decision.plan_hash,
            approver=decision.approver,
            decision=decision.decision,
            comment=decision.comment,
            accepted=refusal_reason is None,
            refusal_reason=refusal_reason,
            via=via,
        )


class VerdictDecision(Frozen):
    """After a failed verification: retry remediation or hand off to a human."""

    actor: EntityId
    choice: Literal["retry", "hand_off"]
    comment: str = ""


class IncidentMark(Frozen):
    """A moment of the incident the workflow saw before or beside its own events (logs, alerts)."""

    at: datetime
    source: str
    event: str


class EvidenceRequest(Frozen):
    """Input of `capture_evidence`."""

    ref: RunRef
    outcome: str
    blast_radius: str | None
    plan_id: str | None
    verification: VerificationResult | None
    approvers: list[str]
    marks: list[IncidentMark] = Field(default_factory=list)
    # Every diagnosis check's verdict and headline (NATS, Loki, Tempo, event sequence, worker regression,
    # ... not only the ones Postgres keeps), as the run last stated them.
    diagnosis: list[CheckResult] = Field(default_factory=list)


class FinishRun(Frozen):
    """Input of `finish_run`."""

    ref: RunRef
    phase: str
    outcome: str
    blast_radius: str | None


class EscalationRequest(Frozen):
    """An approval deadline passed: tell the next tier."""

    ref: RunRef
    plan_id: str
    plan_hash: str
    action_count: int
    money_moved_minor: int
    next_tier: int
    next_approvers: list[str]


class RemediationResult(Frozen):
    """What a remediation ended with."""

    workflow_id: str
    run_id: str
    outcome: Phase
    blast_radius: BlastRadius | None
    plan: PlanSummary | None
    applied: ApplySummary | None
    verification: VerificationResult | None
    approvers: list[str]
    status: StatusView | None = None  # the status query's answer when the run ended (absent before)


class StatusView(Frozen):
    """The `status` query: everything a commander needs on one screen."""

    phase: Phase
    blast_radius: BlastRadius | None
    diagnosis: list[CheckResult]
    drift: dict[str, int]
    plan: PlanSummary | None
    approvals: list[str]
    approvals_needed: int
    rejected_by: str | None
    verification: VerificationResult | None
    frozen: bool
    alerts: list[AlertNotice] = Field(default_factory=list)
    # The payment provider's verdicts on the payment findings, and what the run waits for from it.
    payments: dict[str, int] = Field(default_factory=dict)
    waiting_on_provider: str | None = None
    # Why apply stopped and the run waits for a decision (retry or hand off), when it did.
    stalled: str | None = None
