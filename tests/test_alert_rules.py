"""The shipped alerting rules (issue 15): valid for Prometheus, unit-tested with promtool (firing and
resolving series), and consistent with the intake's routes and the shipped Alertmanager route."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]
RULES = ROOT / "alerting" / "rules" / "billing-runbook.rules.yml"
RULE_TESTS = ROOT / "alerting" / "tests" / "billing-runbook.test.yml"


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool not found: `make test` installs Debian's prometheus package (apt-get)"
    return found


def alert_names(group: str) -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"] for g in groups if g["name"] == group for r in g["rules"]}


def test_promtool_checks_the_rules() -> None:
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 10 rules found" in out.stdout


def test_promtool_rule_tests_fire_and_resolve() -> None:
    out = subprocess.run(
        [promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, cwd=RULE_TESTS.parent
    )
    assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    # Every shipped rule has firing and resolving cases.
    assert tested == alert_names("billing-runbook") | alert_names("billing-remediation")


def test_runbook_alerts_route_to_the_intake_and_start_the_right_trigger() -> None:
    mapping = tomllib.loads((ROOT / "alert_intake" / "alert_mapping.toml").read_text())
    routed = {r["alertname"] for r in mapping["routes"]}
    assert alert_names("billing-runbook") == routed
    # The remediation's own alerts go to people, never back into the intake.
    config = yaml.safe_load((ROOT / "alerting" / "alertmanager.yml").read_text())
    (intake_route,) = [r for r in config["route"]["routes"] if r["receiver"] == "remediation-intake"]
    (matcher,) = intake_route["matchers"]
    pattern = matcher.split("=~", 1)[1].strip().strip('"')
    assert set(pattern.split("|")) == routed
    assert not alert_names("billing-remediation") & routed
    (hook,) = next(r for r in config["receivers"] if r["name"] == "remediation-intake")["webhook_configs"]
    assert hook["send_resolved"] is True
