"""The drift watch's metrics, read from its tick records at scrape time (no state in the worker)."""

from __future__ import annotations

import asyncpg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


async def watch_families(pool: asyncpg.Pool) -> list[Metric]:
    """Last successful tick, interval, ticks by outcome and drift found by kind, per watch."""
    last = GaugeMetricFamily(
        "remediation_watch_last_success_timestamp_seconds",
        "Unix time of the drift watch's last successful tick",
        labels=["watch"],
    )
    interval = GaugeMetricFamily(
        "remediation_watch_interval_seconds", "The drift watch's schedule interval", labels=["watch"]
    )
    ticks = CounterMetricFamily(
        "remediation_watch_ticks", "Drift watch ticks by outcome", labels=["watch", "outcome"]
    )
    found = CounterMetricFamily(
        "remediation_watch_findings", "Drift the watch found, by kind", labels=["watch", "kind"]
    )
    for row in await pool.fetch(
        """SELECT s.watch_id, s.every_seconds,
                  (SELECT extract(epoch FROM max(t.finished_at)) FROM remediation.watch_ticks t
                   WHERE t.watch_id = s.watch_id AND t.outcome = 'ok') AS last_ok
           FROM remediation.watch_state s ORDER BY s.watch_id"""
    ):
        interval.add_metric([row["watch_id"]], float(row["every_seconds"]))
        if row["last_ok"] is not None:
            last.add_metric([row["watch_id"]], float(row["last_ok"]))
    for row in await pool.fetch(
        """SELECT watch_id, coalesce(outcome, 'running') AS outcome, count(*) AS n
           FROM remediation.watch_ticks GROUP BY 1, 2 ORDER BY 1, 2"""
    ):
        ticks.add_metric([row["watch_id"], row["outcome"]], float(row["n"]))
    for row in await pool.fetch(
        """SELECT t.watch_id, f.key AS kind, sum(f.value::bigint) AS n
           FROM remediation.watch_ticks t CROSS JOIN LATERAL jsonb_each_text(t.findings) f
           WHERE t.outcome = 'ok' GROUP BY 1, 2 ORDER BY 1, 2"""
    ):
        found.add_metric([row["watch_id"], row["kind"]], float(row["n"]))
    # The lag is time() minus the last success: the rules and dashboards compute it, not this.
    return [last, interval, ticks, found]
