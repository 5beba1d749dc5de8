"""Stable names of every workflow, activity, signal, update and query (the contract with history)."""

from __future__ import annotations

WORKFLOW = "BillingRemediation"
# Every trigger's value (``contracts.models.Trigger``): the CLI's help lists them without loading pydantic.
TRIGGERS = (
    "worker_failure", "queue_lag", "reconcile_failed", "customer_dispute", "prepaid_depleted", "manual",
    "drift_detected", "reversal",
)  # fmt: skip
LAUNCH_GUARD_WORKFLOW = "LaunchGuardVerification"
DRIFT_WATCH_WORKFLOW = "DriftWatch"

# Configuration
LOAD_RUNTIME_OPTIONS = "config.load_runtime_options"

# Postgres: the remediation's own records
REGISTER_RUN = "records.register_run"
RECORD_TIMELINE = "records.record_timeline"
RECORD_APPROVAL = "records.record_approval"
RECORD_API_ACTION = "records.record_api_action"
SNAPSHOT_SCOPE = "records.snapshot_scope"
CAPTURE_EVIDENCE = "records.capture_evidence"
FINISH_RUN = "records.finish_run"

# Postgres: the billing data
CHECK_POSTGRES = "billing_db.check_postgres"
CHECK_OUTBOX = "billing_db.check_outbox"
CHECK_DATA_CONSISTENCY = "billing_db.check_data_consistency"
ASSESS_BLAST_RADIUS = "billing_db.assess_blast_radius"
RECONCILE = "billing_db.reconcile"
BUILD_PLAN = "billing_db.build_plan"
READ_PLAN_BALANCES = "billing_db.read_plan_balances"
BUILD_REVERSAL_PLAN = "billing_db.build_reversal_plan"
VERIFY_REVERSAL = "billing_db.verify_reversal"
APPLY_PLAN = "billing_db.apply_plan"
CHECK_DUPLICATES = "billing_db.check_duplicates"

# The drift watch.
WATCH_COLLECT_EVENTS = "watch.collect_changed_keys"
WATCH_CATCH_UP = "watch.catch_up"
WATCH_PLAN_TICK = "watch.plan_tick"
WATCH_CHECK_KEYS = "watch.check_changed_keys"
WATCH_FULL_RECONCILE = "watch.full_reconcile"
WATCH_ACT = "watch.act_on_drift"
WATCH_FINISH_TICK = "watch.finish_tick"

# Payment provider (with the findings in Postgres and the webhook worker's lines in Loki)
CHECK_PAYMENTS = "payments.check_payment_findings"
PREFETCH_PAYMENTS = "payments.prefetch_provider_answers"
CHECK_REMEDIATION_CREDITS = "payments.check_remediation_credits"

# NATS JetStream
CHECK_CONSUMER = "nats.check_consumer"
READ_EVENT_SEQUENCE = "nats.read_event_sequence"
PUBLISH_ESCALATION = "nats.publish_escalation"

# Loki and Tempo
QUERY_CORRELATION_LOGS = "loki.query_correlation_logs"
SUMMARIZE_TRACE = "tempo.summarize_trace"

# Alertmanager
CHECK_ALERTS = "alertmanager.check_alerts"
PAGE_APPROVERS = "alertmanager.page_approvers"
# The runbook's alerts (alerting/rules/billing-runbook.rules.yml, group billing-runbook): recovery
# criterion 4 passes only when none of them fires for the run's scope.
RUNBOOK_ALERTS = (
    "BillingWorkerDown",
    "BillingWorkerFailures",
    "BillingQueueLag",
    "PaymentsReconcileFailed",
    "PrepaidBalanceDepleted",
)

# Admin billing API
FREEZE_ADJUSTMENTS = "billing_api.freeze_adjustments"
UNFREEZE_ADJUSTMENTS = "billing_api.unfreeze_adjustments"
CLEAR_RESTRICTION = "billing_api.clear_restriction"
RESTART_BILLING_WORKER = "billing_api.restart_billing_worker"
ROLLBACK_BILLING_WORKER = "billing_api.rollback_billing_worker"
READ_WORKER_DEPLOYMENTS = "billing_api.read_worker_deployments"
CHECK_WORKER_REGRESSION = "billing_api.check_worker_regression"
READ_POSTURE = "billing_api.read_posture"
RUN_PRECHECK = "billing_api.run_precheck"
PROBE_SUBMIT = "billing_api.probe_submit"

# Workflow handlers
UPDATE_APPROVE = "approve"
SIGNAL_APPROVE = "approve_signal"
UPDATE_DECIDE = "decide"
QUERY_STATUS = "status"
QUERY_PLAN = "plan"
QUERY_LAUNCH_GUARD = "launch_guard_report"
SIGNAL_ALERT = "alert"

# Failure types retrying cannot fix (activities raise them; every retry policy stops on them)
NON_RETRYABLE_ERRORS = ["BadInput", "NotFound", "Unauthorized"]
