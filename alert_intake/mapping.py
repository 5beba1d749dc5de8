"""The mapping file: which alerts start which remediation, and which labels name the scope."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contracts.models import RemediationRequest, Scope, Trigger
from workflows.input_errors import explain

DEFAULT_MAPPING = Path(__file__).with_name("alert_mapping.toml")
SCOPE_FIELDS = frozenset(Scope.model_fields)
RequestField = Literal[
    "org_id", "project_id", "user_id", "allocation_id", "app_instance_id", "usage_source",
    "control_plane_component", "correlation_id", "trace_id",
]  # fmt: skip


class MappingError(ValueError):
    """The mapping file is missing or malformed; the message names the file and the field."""


class AlertRefused(ValueError):
    """One alert cannot become a remediation request; the message says why."""


class Route(BaseModel):
    """Alerts named ``alertname`` start a remediation with ``trigger``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alertname: str = Field(min_length=1)
    trigger: Trigger


class Mapping(BaseModel):
    """Routes by alert name and the label-to-field table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requested_by: str = "alertmanager"
    routes: list[Route] = Field(min_length=1)
    labels: dict[str, RequestField] = Field(default_factory=dict)

    def trigger_for(self, alertname: str) -> Trigger | None:
        """The trigger of the route for ``alertname``, or None when no route matches."""
        return next((r.trigger for r in self.routes if r.alertname == alertname), None)

    def request(
        self,
        trigger: Trigger,
        labels: dict[str, str],
        *,
        default_correlation: str,
        requested_by: str | None = None,
    ) -> RemediationRequest:
        """The remediation request these labels describe (refused with the offending label named)."""
        fields: dict[str, str] = {}
        for label, value in labels.items():
            target = self.labels.get(label)
            if target is None or not value:
                continue
            if target in fields and fields[target] != value:
                raise AlertRefused(f"labels disagree on {target}: {fields[target]!r} vs {value!r}")
            fields[target] = value
        scope = {k: v for k, v in fields.items() if k in SCOPE_FIELDS}
        try:
            return RemediationRequest(
                correlation_id=fields.get("correlation_id", default_correlation),
                trace_id=fields.get("trace_id"),
                scope=Scope(**scope),
                trigger=trigger,
                requested_by=requested_by or self.requested_by,
            )
        except ValidationError as err:
            raise AlertRefused(explain(err)) from None


def load_mapping(path: Path | None = None) -> Mapping:
    """Read and validate the mapping file (the packaged default when ``path`` is None)."""
    path = path or DEFAULT_MAPPING
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise MappingError(f"alert mapping {path}: cannot read ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise MappingError(f"alert mapping {path}: not valid TOML ({err})") from None
    try:
        return Mapping.model_validate(data)
    except ValidationError as err:
        raise MappingError(f"alert mapping {path}: {explain(err, 'file')}") from None
