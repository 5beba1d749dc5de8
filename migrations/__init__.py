"""SQL migrations for the remediation schema (and the runner the platform stand-in shares)."""

from migrations.runner import apply_migrations, remediation_migrations_dir

__all__ = ["apply_migrations", "remediation_migrations_dir"]
