"""The benchmarks run (at a tiny size) and print well-formed figures; their size is not tested here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.time_to_plan import drift_for


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
            "--incidents",
            "5",
            "--memory-sizes",
            "30,300",
            "--payment-findings",
            "20",
            "--time-to-plan-sizes",
            "2000,4000",
            "--watch-changed",
            "500",
            "--watch-interval",
            "10",
            "--cli-runs",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    lines = {row["benchmark"]: row for row in rows}
    assert set(lines) == {
        "machine", "seed", "reconcile", "naive", "scoped", "apply", "payment_checks", "workflows", "memory",
        "time_to_plan_seed", "time_to_plan", "time_to_plan_watch", "watch_tick", "drift_to_approval", "reversal",
        "cli",
    }  # fmt: skip
    # The CLI run as processes, beside the interpreter's own start and the Temporal client's import.
    cli = lines["cli"]
    assert cli["runs"] == 2 and 0 < cli["python_floor_median_s"] < cli["help_median_s"]
    assert cli["status_max_s"] >= cli["status_median_s"] > 0
    # The apply's run reversed in full, beside its forward apply: every entry it posted has its inverse.
    reversal = lines["reversal"]
    assert reversal["actions"] == reversal["applied"] == lines["apply"]["applied"] > 0
    assert reversal["entries_left_unreversed"] == 0 and reversal["forward_apply_actions_per_s"] > 0
    # The watch: one tick of the changed keys beside the full reconciliation of the same database.
    tick = lines["watch_tick"]
    assert tick["changed_allocations"] == 500 and tick["tick_s"] > 0 and tick["full_reconcile_s"] > 0
    assert 0 < lines["drift_to_approval"]["seconds"] < 3 * 10 + 120
    assert set(lines["scoped"]["by_kind"]) == {"org", "project", "user", "allocation"}
    # Start → plan awaiting approval, three runs of each incident per size, with where the time went.
    timed = [row for row in rows if row["benchmark"] == "time_to_plan"]
    watched = "global, planned from the drift watch"
    assert [(r["usage_rows"], r["incident"]) for r in timed] == [
        (size, incident)
        for size in (2000, 4000)
        for incident in ("global", "dispute", watched)
        for _ in range(3)
    ]
    drift = sum(drift_for(2000).values())
    for row in timed:
        assert row["start_to_plan_s"] > 0
        assert "billing_db.build_plan" in row["activities_s"]
        # The platform-wide plan fixes every injected drift (also from the watch's state); the dispute
        # only its user's share.
        if row["incident"] == "dispute":
            assert 1 <= row["plan_actions"] < drift
        else:
            assert row["plan_actions"] == drift
        if row["incident"] == watched:
            assert row["findings_from"].startswith("drift watch 'ttp': its full pass"), row
    # Every payment finding got the provider's verdict, in the seeded mix (60/20/10/10 %).
    payments = lines["payment_checks"]
    assert payments["findings"] == 20
    assert payments["verdicts"] == {"captured": 12, "not_captured": 4, "investigate": 4}
    assert payments["speedup"] > 0
    assert lines["reconcile"]["findings"] == sum(lines["seed"]["injected"].values())
    assert lines["reconcile"]["ratio_to_floor"] > 0
    assert lines["apply"]["applied"] == lines["apply"]["actions"] == 300
    # Applying the same fixes again changes nothing.
    assert lines["apply"]["second_apply_changed_rows"] == 0
    assert lines["apply"]["second_apply_already_applied"] == 300
    assert lines["apply"]["second_apply_stale"] == 0
    # The workflow's history does not grow with the plan: ids pass through it, never the actions.
    small, large = [row for row in rows if row["benchmark"] == "memory"]
    assert small["outcome"] == large["outcome"] == "completed"
    assert large["plan_actions"] > 5 * small["plan_actions"]
    assert large["activities_scheduled"] == small["activities_scheduled"]
    # Total events differ only by how workflow tasks batched (a few), never by the plan's size (10x).
    assert large["history_events"] <= small["history_events"] * 1.1 + 5
    # The largest payload (the run's result: its status and plan summary) is the same size for a 10x plan.
    assert large["largest_payload_bytes"] < 8192
    assert abs(large["largest_payload_bytes"] - small["largest_payload_bytes"]) < 256
    # The approval page serves both plans (its timings are figures, not assertions).
    assert set(large["approval_page_ms"]) == {"first_page", "page_after_500"}
    assert small["run_peak_rss_mb"] > 0 and large["run_peak_rss_mb"] > 0


def _servers_under(root: Path) -> list[str]:
    """Processes whose command line names ``root`` (the benchmark's servers keep their state there)."""
    found = subprocess.run(["pgrep", "-af", str(root)], capture_output=True, text=True, check=False)
    return [line for line in found.stdout.splitlines() if "pgrep" not in line]


def _postgres_servers() -> set[str]:
    """Running Postgres servers (as root their data lives outside the benchmark's directory)."""
    found = subprocess.run(["pgrep", "-f", "postgres -D"], capture_output=True, text=True, check=False)
    return set(found.stdout.split())


def test_a_terminated_benchmark_stops_the_servers_it_started(tmp_path: Path) -> None:
    postgres_before = _postgres_servers()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "--usage-rows", "0", "--apply-actions", "0",
         "--payment-findings", "0", "--watch-changed", "0", "--watch-interval", "0", "--memory-sizes", "",
         "--time-to-plan-sizes", "", "--cli-runs", "0", "--incidents", "500"],
        env=os.environ | {"TMPDIR": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        # Wait until its stack is up (Temporal's dev server is the last to start), then terminate it.
        while not any("temporal" in line for line in _servers_under(tmp_path)):
            assert proc.poll() is None and time.monotonic() < deadline, "the benchmark's stack never started"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143, proc.stderr.read()[-2000:] if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _servers_under(tmp_path) == []
    assert _postgres_servers() <= postgres_before
