"""Activities, one module per system they touch; each wraps driver errors into the project's own.

- ``postgres/``: diagnosis, reconciliation, plans and apply on the billing tables (one module each) and
  ``postgres/records``: the remediation's runs, timeline, approvals audit, snapshots and evidence
- ``nats_jetstream``: consumer health, event sequences, escalations
- ``loki`` / ``tempo``: logs and traces over their HTTP APIs
- ``billing_api``: the platform's admin billing API
- ``runtime_config``: the approval policy and thresholds from settings
"""
