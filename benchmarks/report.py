"""How benchmarks report: one JSON line per measurement on stdout."""

from __future__ import annotations

import json
from typing import Any


def emit(name: str, **figures: Any) -> None:
    """Print one measurement as a JSON line."""
    print(json.dumps({"benchmark": name, **figures}), flush=True)
