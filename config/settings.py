"""Settings for every entrypoint, loaded once from the environment (never at import time)."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EVIDENCE_SIGNER = "evidence-signer"  # key name of the worker's evidence-signing key pair
SEARCH_ATTRIBUTES: tuple[str, ...] = (
    "CorrelationId",
    "OrgId",
    "ProjectId",
    "UserId",
    "AllocationId",
    "RemediationPhase",
    "BlastRadius",
    "Trigger",
    "ApprovalState",
)
"""Custom Keyword search attributes every remediation upserts; registered by `remediate dev up`."""


class Approver(BaseModel):
    """One configured approver: a name, a role and (optionally) an Ed25519 public key."""

    name: str = Field(min_length=1, max_length=64)
    role: str = Field(default="billing-oncall", max_length=64)
    tier: int = Field(default=1, ge=1, le=9)
    public_key: str | None = None

    @field_validator("public_key")
    @classmethod
    def _ed25519(cls, value: str | None) -> str | None:
        # A malformed key would make every approval "bad signature"; say so at start instead.
        if value is not None:
            try:
                raw = base64.b64decode(value, validate=True)
            except binascii.Error:
                raise ValueError("public_key is not base64") from None
            if len(raw) != 32:
                raise ValueError(f"public_key must be a 32-byte Ed25519 key, got {len(raw)} bytes")
        return value


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` so it can be printed or logged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


class Settings(BaseSettings):
    """Every knob of the project; unset server URLs mean "use the embedded stack"."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    state_dir: Path = Field(default=Path(".remediation"), alias="REMEDIATION_STATE_DIR")
    # As root, the embedded Postgres runs as an unprivileged user from here (binaries and clusters).
    pg_service_home: Path = Field(default=Path("/var/lib/billing-remediation"), alias="REMEDIATION_PG_HOME")

    # Existing deployments (production). When unset, the embedded servers are used.
    database_url: SecretStr | None = Field(default=None, alias="DATABASE_URL")
    nats_url: str | None = Field(default=None, alias="NATS_URL")
    temporal_address: str | None = Field(default=None, alias="TEMPORAL_ADDRESS")
    temporal_namespace: str = Field(default="default", alias="TEMPORAL_NAMESPACE")
    temporal_ui_url: str | None = Field(default=None, alias="TEMPORAL_UI_URL")
    task_queue: str = Field(default="billing-remediation", alias="REMEDIATION_TASK_QUEUE")

    # Embedded-stack ports (loopback only).
    postgres_port: int = Field(default=8491, alias="POSTGRES_PORT")
    nats_port: int = Field(default=8492, alias="NATS_PORT")
    temporal_port: int = Field(default=7233, alias="TEMPORAL_PORT")
    temporal_ui_port: int = Field(default=8233, alias="TEMPORAL_UI_PORT")
    # The embedded dev server's SQLite in WAL mode, synced at checkpoints: a killed server loses nothing
    # (the log is written before each commit returns); a power cut may lose its last commits.
    temporal_dev_sqlite_wal: bool = Field(default=True, alias="TEMPORAL_DEV_SQLITE_WAL")
    platform_port: int = Field(default=8480, alias="PLATFORM_PORT")

    # The billing platform's HTTP APIs.
    billing_api_url: str | None = Field(default=None, alias="BILLING_API_URL")
    billing_api_token: SecretStr = Field(default=SecretStr("dev-admin-token"), alias="BILLING_API_TOKEN")
    loki_url: str | None = Field(default=None, alias="LOKI_URL")
    loki_tenant: str | None = Field(default=None, alias="LOKI_TENANT")
    tempo_url: str | None = Field(default=None, alias="TEMPO_URL")
    tempo_tenant: str | None = Field(default=None, alias="TEMPO_TENANT")
    http_timeout_seconds: float = Field(default=10.0, alias="HTTP_TIMEOUT_SECONDS")

    # The payment provider (Stripe's API; the embedded default is localstripe on loopback).
    payment_provider_url: str | None = Field(default=None, alias="PAYMENT_PROVIDER_URL")
    payment_provider_api_key: SecretStr = Field(
        default=SecretStr("sk_test_local_stand_in"), alias="PAYMENT_PROVIDER_API_KEY"
    )
    payment_provider_port: int = Field(default=8482, alias="PAYMENT_PROVIDER_PORT")
    payment_provider_concurrency: int = Field(default=8, ge=1, le=64, alias="PAYMENT_PROVIDER_CONCURRENCY")
    payment_provider_retries: int = Field(default=3, ge=0, le=10, alias="PAYMENT_PROVIDER_RETRIES")
    # While the provider does not answer, a run waits this long between asks (it never credits unconfirmed).
    payment_provider_wait_seconds: int = Field(default=30, ge=1, alias="PAYMENT_PROVIDER_WAIT_SECONDS")
    # A platform-wide plan starts from a drift watch that is keeping up (its last full pass plus the keys
    # changed since) instead of reading every row; verification still runs the full pass.
    plan_from_watch: bool = Field(default=True, alias="PLAN_FROM_WATCH")

    # NATS: where the billing worker consumes.
    billing_stream: str = Field(default="PLATFORM", alias="BILLING_STREAM")
    billing_consumer: str = Field(default="billing-worker", alias="BILLING_CONSUMER")

    # Worker Deployment Versioning: runs are pinned to the build they started on (docs/operations.md).
    worker_versioning: Literal["on", "off"] = Field(default="on", alias="WORKER_VERSIONING")
    worker_deployment_name: str = Field(default="billing-remediation", alias="WORKER_DEPLOYMENT_NAME")
    worker_build_id: str | None = Field(default=None, alias="WORKER_BUILD_ID")

    # Approval policy.
    approvers: list[Approver] = Field(
        default_factory=lambda: [
            Approver(name="alice", role="billing-lead", tier=1),
            Approver(name="bob", role="finance", tier=1),
            Approver(name="carol", role="vp-engineering", tier=2),
        ],
        alias="APPROVERS",
    )
    approval_quorum: int = Field(default=2, ge=1, le=9, alias="APPROVAL_QUORUM")
    approval_money_threshold_minor: int = Field(default=100_000, ge=0, alias="APPROVAL_MONEY_THRESHOLD_MINOR")
    approval_rows_threshold: int = Field(default=1_000, ge=0, alias="APPROVAL_ROWS_THRESHOLD")
    approval_deadline_seconds: int = Field(default=3600, ge=1, alias="APPROVAL_DEADLINE_SECONDS")
    approval_hard_limit_seconds: int = Field(default=86_400, ge=1, alias="APPROVAL_HARD_LIMIT_SECONDS")
    # "required": only approvals signed with the approver's Ed25519 key count.
    approval_signatures: Literal["required", "off"] = Field(default="required", alias="APPROVAL_SIGNATURES")
    approver_keys_dir: Path | None = Field(default=None, alias="APPROVER_KEYS_DIR")
    # The worker signs each evidence pack's audit-chain head with this Ed25519 key; verifiers trust
    # EVIDENCE_PUBLIC_KEY (or the .pub beside the key in the keys directory).
    evidence_signing_key_file: Path | None = Field(default=None, alias="EVIDENCE_SIGNING_KEY_FILE")
    evidence_public_key: str | None = Field(default=None, alias="EVIDENCE_PUBLIC_KEY")

    # Verification.
    verify_window_seconds: int = Field(default=20, ge=0, alias="VERIFY_WINDOW_SECONDS")
    consumer_pending_threshold: int = Field(default=100, ge=0, alias="CONSUMER_PENDING_THRESHOLD")
    widespread_org_threshold: int = Field(default=3, ge=1, alias="WIDESPREAD_ORG_THRESHOLD")
    # The platform-wide drift/consistency summary: scoped runs read it instead of scanning the platform.
    # The worker measures it every REFRESH seconds (0: never; then only platform-wide runs write it).
    platform_summary_refresh_seconds: int = Field(default=300, ge=0, alias="PLATFORM_SUMMARY_REFRESH_SECONDS")
    platform_summary_max_age_seconds: int = Field(default=900, ge=1, alias="PLATFORM_SUMMARY_MAX_AGE_SECONDS")

    # Where a CLI command's JSON log lines go besides $REMEDIATION_STATE_DIR/logs/cli.log:
    # "auto" = also stderr unless it is a terminal; "stderr" = always; "file" = never.
    cli_log: Literal["auto", "stderr", "file"] = Field(default="auto", alias="CLI_LOG")

    # The approval page (`remediate approvals serve`): loopback by default. Readers authenticate with
    # APPROVALS_TOKEN (or its file; `dev up` makes one) or, behind a reverse proxy that authenticates,
    # with the user name in APPROVALS_USER_HEADER (only ever honoured when set).
    approvals_host: str = Field(default="127.0.0.1", alias="APPROVALS_HOST")
    approvals_port: int = Field(default=8484, alias="APPROVALS_PORT")
    # The approval page as approvers' browsers reach it (behind a proxy, a public name); default its bind.
    approvals_public_url: str | None = Field(default=None, alias="APPROVALS_PUBLIC_URL")
    # The embedded stack's approver inbox: where its Alertmanager delivers pages (SMTP and a webhook).
    approver_inbox_smtp_port: int = Field(default=8494, alias="APPROVER_INBOX_SMTP_PORT")
    approver_inbox_http_port: int = Field(default=8495, alias="APPROVER_INBOX_HTTP_PORT")
    approvals_token: SecretStr | None = Field(default=None, alias="APPROVALS_TOKEN")
    approvals_token_file: Path | None = Field(default=None, alias="APPROVALS_TOKEN_FILE")
    approvals_user_header: str | None = Field(default=None, alias="APPROVALS_USER_HEADER")

    # Prometheus and Alertmanager: embedded on loopback unless the URLs point at existing ones.
    prometheus_url: str | None = Field(default=None, alias="PROMETHEUS_URL")
    prometheus_port: int = Field(default=8490, alias="PROMETHEUS_PORT")
    alertmanager_url: str | None = Field(default=None, alias="ALERTMANAGER_URL")
    alertmanager_port: int = Field(default=8493, alias="ALERTMANAGER_PORT")
    # After criterion 4 passes, how long verification waits for Alertmanager's "resolved" notification
    # of the alerts recorded on the run (so it is recorded on the run, not lost after it ends).
    alert_resolved_wait_seconds: int = Field(default=120, ge=0, alias="ALERT_RESOLVED_WAIT_SECONDS")

    # Prometheus metrics of the worker (its own, and the Temporal SDK's); 0 turns an endpoint off.
    metrics_host: str = Field(default="127.0.0.1", alias="METRICS_HOST")
    worker_metrics_port: int = Field(default=8486, ge=0, le=65535, alias="WORKER_METRICS_PORT")
    temporal_sdk_metrics_port: int = Field(default=8487, ge=0, le=65535, alias="TEMPORAL_SDK_METRICS_PORT")

    # OpenTelemetry: spans go to this OTLP/HTTP endpoint when set (standard variable name).
    otlp_endpoint: str | None = Field(default=None, alias="OTEL_EXPORTER_OTLP_ENDPOINT")

    # Workflow-history encryption (AES-256-GCM payload codec); on everywhere except the demo.
    payload_encryption: Literal["on", "off"] = Field(default="on", alias="PAYLOAD_ENCRYPTION")
    payload_key: SecretStr | None = Field(default=None, alias="PAYLOAD_KEY")
    payload_key_file: Path | None = Field(default=None, alias="PAYLOAD_KEY_FILE")

    # Codec server (`remediate codec-server`): lets the Temporal UI show decrypted payloads to who may read them.
    codec_host: str = Field(default="127.0.0.1", alias="CODEC_HOST")
    codec_port: int = Field(default=8481, alias="CODEC_PORT")
    codec_token: SecretStr | None = Field(default=None, alias="CODEC_TOKEN")
    codec_jwks_url: str | None = Field(default=None, alias="CODEC_JWKS_URL")
    codec_jwt_issuer: str | None = Field(default=None, alias="CODEC_JWT_ISSUER")
    codec_jwt_audience: str | None = Field(default=None, alias="CODEC_JWT_AUDIENCE")
    codec_jwt_group_claim: str = Field(default="groups", alias="CODEC_JWT_GROUP_CLAIM")
    codec_jwt_group: str | None = Field(default=None, alias="CODEC_JWT_GROUP")
    codec_jwt_encode_group: str | None = Field(default=None, alias="CODEC_JWT_ENCODE_GROUP")
    codec_encode: Literal["on", "off"] = Field(default="off", alias="CODEC_ENCODE")
    codec_namespaces: list[str] | None = Field(default=None, alias="CODEC_NAMESPACES")
    codec_max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, alias="CODEC_MAX_BODY_BYTES")
    codec_jwks_cache_seconds: float = Field(default=300, gt=0, alias="CODEC_JWKS_CACHE_SECONDS")

    # How fast work held by a dead worker moves on: short activities' timeout, long ones' heartbeat.
    activity_timeout_seconds: int = Field(default=60, ge=1, alias="ACTIVITY_TIMEOUT_SECONDS")
    heartbeat_seconds: int = Field(default=30, ge=1, alias="ACTIVITY_HEARTBEAT_SECONDS")
    retry_max_interval_seconds: int = Field(default=30, ge=1, alias="ACTIVITY_RETRY_MAX_INTERVAL_SECONDS")

    # Alert intake (`remediate alerts serve`): Alertmanager webhook receiver and NATS subscriber.
    alerts_host: str = Field(default="127.0.0.1", alias="ALERTS_HOST")
    alerts_port: int = Field(default=9095, alias="ALERTS_PORT")
    alerts_token: SecretStr | None = Field(default=None, alias="ALERTS_TOKEN")
    # Where the token is read from when ALERTS_TOKEN is not set (`dev up` makes a local one).
    alerts_token_file: Path | None = Field(default=None, alias="ALERTS_TOKEN_FILE")
    alerts_mapping_file: Path | None = Field(default=None, alias="ALERTS_MAPPING_FILE")
    alerts_nats: Literal["on", "off"] = Field(default="on", alias="ALERTS_NATS")
    alerts_nats_subject: str = Field(default="payments.reconcile_failed", alias="ALERTS_NATS_SUBJECT")
    alerts_nats_durable: str = Field(default="remediation-alert-intake", alias="ALERTS_NATS_DURABLE")

    # `remediate demo`: how long it waits for the run to finish before it gives up with a non-zero exit.
    demo_timeout_seconds: float = Field(default=300, gt=0, alias="DEMO_TIMEOUT_SECONDS")

    apply_batch_size: int = Field(default=500, ge=1, le=10_000, alias="APPLY_BATCH_SIZE")
    worker_restart_hook_url: str | None = Field(default=None, alias="WORKER_RESTART_HOOK_URL")
    worker_rollback_hook_url: str | None = Field(default=None, alias="WORKER_ROLLBACK_HOOK_URL")

    @field_validator("payment_provider_url", mode="before")
    @classmethod
    def _empty_is_embedded(cls, value: object) -> object:
        # PAYMENT_PROVIDER_URL="" means the embedded provider, as if unset.
        return None if value == "" else value

    @field_validator("codec_namespaces", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        # Allow CODEC_NAMESPACES="default,billing" as well as a JSON list.
        if isinstance(value, str) and not value.lstrip().startswith("["):
            return [n.strip() for n in value.split(",") if n.strip()]
        return value

    @field_validator("approvers", mode="before")
    @classmethod
    def _names_only(cls, value: object) -> object:
        # Allow APPROVERS="alice,bob" as well as the JSON list form.
        if isinstance(value, str) and not value.lstrip().startswith("["):
            return [{"name": n.strip()} for n in value.split(",") if n.strip()]
        return value

    # Resolved addresses -------------------------------------------------------------

    def resolved_database_url(self) -> str:
        """The Postgres DSN: the configured one or the embedded server's."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"postgresql://postgres@127.0.0.1:{self.postgres_port}/postgres"

    def resolved_nats_url(self) -> str:
        """The NATS URL: the configured one or the embedded server's."""
        return self.nats_url or f"nats://127.0.0.1:{self.nats_port}"

    def resolved_temporal_address(self) -> str:
        """The Temporal frontend address: the configured one or the embedded dev server's."""
        return self.temporal_address or f"127.0.0.1:{self.temporal_port}"

    def resolved_ui_url(self) -> str:
        """Base URL of the Temporal UI."""
        return self.temporal_ui_url or f"http://127.0.0.1:{self.temporal_ui_port}"

    def resolved_billing_api_url(self) -> str:
        """Base URL of the admin billing API (the stand-in's by default)."""
        return self.billing_api_url or f"http://127.0.0.1:{self.platform_port}"

    def resolved_loki_url(self) -> str:
        """Base URL of Loki (the stand-in serves Loki's API by default)."""
        return self.loki_url or self.resolved_billing_api_url()

    def resolved_tempo_url(self) -> str:
        """Base URL of Tempo (the stand-in serves Tempo's API by default)."""
        return self.tempo_url or self.resolved_billing_api_url()

    def resolved_payment_provider_url(self) -> str:
        """Base URL of the payment provider's API (the embedded localstripe by default)."""
        return self.payment_provider_url or f"http://127.0.0.1:{self.payment_provider_port}"

    def resolved_alertmanager_url(self) -> str:
        """Base URL of Alertmanager (the embedded one by default)."""
        return self.alertmanager_url or f"http://127.0.0.1:{self.alertmanager_port}"

    def resolved_prometheus_url(self) -> str:
        """Base URL of Prometheus (the embedded one by default)."""
        return self.prometheus_url or f"http://127.0.0.1:{self.prometheus_port}"

    def resolved_alerts_token_file(self) -> Path:
        """Where the alert intake's bearer token is read from when ALERTS_TOKEN is not set."""
        return self.alerts_token_file or self.state_dir / "alerts.token"

    def resolved_alerts_token(self) -> str | None:
        """The alert intake's bearer token: ALERTS_TOKEN, else the token file's content, else None."""
        if self.alerts_token is not None and self.alerts_token.get_secret_value():
            return self.alerts_token.get_secret_value()
        path = self.resolved_alerts_token_file()
        return path.read_text().strip() or None if path.exists() else None

    def resolved_approvals_token_file(self) -> Path:
        """Where the approval page's token is read from when APPROVALS_TOKEN is not set."""
        return self.approvals_token_file or self.state_dir / "approvals.token"

    def resolved_approvals_token(self) -> str | None:
        """The approval page's access token: APPROVALS_TOKEN, else the token file's content, else None."""
        if self.approvals_token is not None and self.approvals_token.get_secret_value():
            return self.approvals_token.get_secret_value()
        path = self.resolved_approvals_token_file()
        return path.read_text().strip() or None if path.exists() else None

    def approvals_url(self) -> str:
        """The approval page's base URL."""
        return f"http://{self.approvals_host}:{self.approvals_port}"

    def resolved_approvals_public_url(self) -> str:
        """The approval page's URL in pages and links (APPROVALS_PUBLIC_URL, else its bind address)."""
        return (self.approvals_public_url or self.approvals_url()).rstrip("/")

    def approvals_link(self, *, to_terminal: bool) -> str | None:
        """The sign-in link: with the token on a terminal; elsewhere (a log, a pipe) naming where it is,
        so the token never lands in a file wider than its own 0600 one. None without a token."""
        token = self.resolved_approvals_token()
        if token is None:
            return None
        if to_terminal:
            return f"{self.approvals_url()}/?token={token}"
        where = "APPROVALS_TOKEN" if self.approvals_token else self.resolved_approvals_token_file()
        return f"{self.approvals_url()}/?token=<the token in {where}>"

    def resolved_payload_key_file(self) -> Path:
        """Where the payload keys are read from when PAYLOAD_KEY is not set."""
        return self.payload_key_file or self.state_dir / "payload.key"

    def resolved_evidence_key_file(self) -> Path:
        """The worker's evidence-signing private key (``evidence-signer.key`` in the keys directory)."""
        return self.evidence_signing_key_file or self.resolved_keys_dir() / f"{EVIDENCE_SIGNER}.key"

    def resolved_keys_dir(self) -> Path:
        """Where approver key files live (``NAME.key`` private, ``NAME.pub`` public)."""
        return self.approver_keys_dir or self.state_dir / "keys"

    def resolved_codec_namespaces(self) -> list[str]:
        """The namespaces whose payloads the codec server serves (the worker's namespace by default)."""
        return self.codec_namespaces or [self.temporal_namespace]

    def resolved_codec_endpoint(self) -> str:
        """The codec server's URL, as the UI and the `temporal` CLI are configured with it."""
        return f"http://{self.codec_host}:{self.codec_port}"

    def workflow_ui_link(self, workflow_id: str) -> str:
        """Link to a workflow's page in the Temporal UI."""
        return f"{self.resolved_ui_url()}/namespaces/{self.temporal_namespace}/workflows/{workflow_id}"


def load_settings() -> Settings:
    """Load settings from the environment; call once per entrypoint."""
    return Settings()
