"""The README's configuration table documents every setting."""

from __future__ import annotations

import re
from pathlib import Path

from config import Settings

README = Path(__file__).parents[1] / "README.md"


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    table = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))
    aliases = {field.alias for field in Settings.model_fields.values() if field.alias}
    assert aliases - documented == set(), "settings missing from README ## Configuration"
