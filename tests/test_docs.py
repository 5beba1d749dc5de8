"""The README's configuration table documents every setting; the compose file matches the code."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from config import SEARCH_ATTRIBUTES, Settings
from workflows import search_attributes

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    table = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))
    aliases = {field.alias for field in Settings.model_fields.values() if field.alias}
    assert aliases - documented == set(), "settings missing from README ## Configuration"


def test_compose_file_registers_the_workflows_search_attributes_and_sets_only_known_settings() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.temporal.yml").read_text())
    services = compose["services"]
    registered = set(
        re.findall(r"for a in ([A-Za-z ]+);", services["temporal-admin-tools"]["entrypoint"])[0].split()
    )
    # One list of names: what dev up and the tests register, the compose job, and the keys the workflows set.
    assert registered == set(SEARCH_ATTRIBUTES) == {key.name for key in search_attributes.ALL}
    aliases = {field.alias for field in Settings.model_fields.values() if field.alias}
    for name in ("remediation-worker", "alert-intake", "codec-server", "remediation-deployment"):
        service = services[name]
        assert set(service["environment"]) <= aliases, name
        assert "PAYLOAD_KEY" in service["environment"], "payloads are encrypted by default"
    for name in ("remediation-worker", "alert-intake"):
        assert (
            services[name]["depends_on"]["temporal-admin-tools"]["condition"]
            == "service_completed_successfully"
        )
    # The build that runs is the build made current, under one deployment name.
    worker, deploy = (
        services["remediation-worker"]["environment"],
        services["remediation-deployment"]["environment"],
    )
    assert worker["WORKER_DEPLOYMENT_NAME"] == deploy["WORKER_DEPLOYMENT_NAME"]
    assert worker["WORKER_BUILD_ID"] == deploy["WORKER_BUILD_ID"]


def test_the_alertmanager_snippet_in_operations_is_the_shipped_configuration() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    block = doc.split("   ```yaml\n", 1)[1].split("   ```", 1)[0]
    snippet = "\n".join(line[3:] for line in block.splitlines())
    assert snippet.strip() == (ROOT / "alerting" / "alertmanager.yml").read_text().strip()
