"""The benchmarks run (at a tiny size) and print well-formed figures; their size is not tested here."""

from __future__ import annotations

import json
import subprocess
import sys


def test_benchmarks_print_one_json_line_per_measurement() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--usage-rows",
            "4000",
            "--apply-actions",
            "300",
            "--scopes",
            "5",
            "--naive-sample",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = {row["benchmark"]: row for row in map(json.loads, out.stdout.splitlines())}
    assert set(lines) == {"machine", "seed", "reconcile", "naive", "scoped", "apply"}
    assert lines["reconcile"]["findings"] == sum(lines["seed"]["injected"].values())
    assert lines["reconcile"]["ratio_to_floor"] > 0
    assert lines["apply"]["applied"] == lines["apply"]["actions"] == 300
    # Applying the same fixes again changes nothing.
    assert lines["apply"]["second_apply_changed_rows"] == 0
    assert lines["apply"]["second_apply_skipped"] == 300
