"""A faithful local stand-in for the GPUaaS billing platform.

The remediation workflows and activities never import this package: they reach it only through
Postgres, NATS and HTTP, exactly as they reach production.
"""
