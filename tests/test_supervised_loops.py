"""Long-running loops never die silently (issue 20): the stand-in's billing worker survives its consumer
being deleted and re-created underneath it, says so on /healthz and in its log, and the supervisor
restarts any failing loop with the reason logged."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from local_platform.events import ensure_worker_consumer
from local_platform.seeder import SeedSpec, seed
from tests.helpers import eventually
from worker.supervised_loop import LoopHealth, start_supervised, supervise

from .conftest import World

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _health(world: World) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=world.settings.resolved_billing_api_url(), timeout=10) as http:
        response = await http.get("/healthz")
    return response.status_code, response.json()


async def _until(predicate: Any, timeout: float = 30, what: str = "condition") -> None:
    await eventually(predicate, timeout=timeout, what=what)


async def test_worker_survives_its_consumer_being_recreated_underneath_it(world: World) -> None:
    stream, durable = world.settings.billing_stream, world.settings.billing_consumer
    status, body = await _health(world)
    assert status == 200 and body["ok"] is True
    assert body["loops"]["billing_worker"]["restarts"] == 0
    async with world.db.acquire() as conn:
        report = await seed(
            conn, SeedSpec(orgs=2, allocations=40, prefix="sv", seed=21, inject={"missing_open": 3}), world.nc
        )
    missing = report.injected["missing_open"]
    js = world.nc.jetstream()

    # The race of the demo that hung: the consumer disappears under a running worker (a second
    # process preparing the platform used to delete and re-create it) while the worker is fetching.
    await js.delete_consumer(stream, durable)

    async def restarted() -> bool:
        return int((await _health(world))[1]["loops"]["billing_worker"]["restarts"]) >= 1

    await _until(restarted, what="the worker loop to fail and restart")
    await ensure_worker_consumer(js, stream, durable)  # the other process re-creates it (a no-op if back)

    # Events published after the race are processed: the worker is alive and bound to the new consumer.
    for alloc in missing:
        await world.nc.publish(
            "provisioning.active",
            f'{{"allocation_id": "{alloc}", "correlation_id": "sv-race", "trace_id": ""}}'.encode(),
        )
    await world.nc.flush()

    async def processed() -> bool:
        n = await world.db.fetchval(
            "SELECT count(*) FROM billing.usage_records WHERE allocation_id = ANY($1::text[]) AND end_time IS NULL",
            missing,
        )
        return int(n) == len(missing)

    await _until(processed, what="the worker to open usage for the published events")
    info = await js.consumer_info(stream, durable)
    assert info.num_ack_pending == 0
    status, body = await _health(world)
    loop = body["loops"]["billing_worker"]
    assert status == 200 and loop["state"] == "running"
    assert "ServiceUnavailableError" in loop["last_error"]  # no responders: the consumer was gone
    # The platform's own log (what its Loki endpoint serves) says why the worker restarted.
    logged = await world.db.fetchval(
        """SELECT count(*) FROM platform_obs.logs WHERE service = 'gpuaas-billing-worker'
           AND line LIKE '%billing_worker failed:%restarting%'"""
    )
    assert logged >= 1


async def test_ensure_worker_consumer_never_deletes_a_live_consumer(world: World) -> None:
    js = world.nc.jetstream()
    stream, durable = world.settings.billing_stream, world.settings.billing_consumer
    before = await js.consumer_info(stream, durable)
    await asyncio.gather(*(ensure_worker_consumer(js, stream, durable) for _ in range(8)))
    after = await js.consumer_info(stream, durable)
    assert after.created == before.created  # the same consumer, not a re-created one


async def test_supervisor_restarts_a_failing_loop_and_logs_each_failure_and_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = asyncio.Event()
    health = LoopHealth("flaky")
    lives: list[int] = []

    async def body(h: LoopHealth) -> None:
        lives.append(len(lives))
        if len(lives) == 1:
            raise ConnectionResetError("peer went away")
        if len(lives) == 2:
            return  # returning without being stopped is a failure too
        h.progress()
        await stop.wait()

    with caplog.at_level(logging.INFO, logger="billing_remediation.loops"):
        task = asyncio.create_task(supervise(health, body, stop, initial_backoff=0.01))
        await _until(lambda: _true(len(lives) == 3), timeout=5, what="a third life")
        assert health.state == "running" and health.healthy and health.restarts == 2
        assert health.last_error == "LoopExited: flaky returned without being asked to stop"
        stop.set()
        await asyncio.wait_for(task, 5)
    assert health.as_dict()["state"] == "stopped"
    messages = [r.getMessage() for r in caplog.records]
    assert any("flaky failed: ConnectionResetError: peer went away; restart 1" in m for m in messages)
    assert any("flaky restarting (restart 1) after: ConnectionResetError" in m for m in messages)
    assert any("flaky failed: LoopExited" in m for m in messages)


async def test_a_failing_loop_is_unhealthy_and_a_loop_nobody_runs_is_marked_dead(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = asyncio.Event()
    health = LoopHealth("always-failing")

    async def body(_: LoopHealth) -> None:
        raise RuntimeError("cannot connect")

    task = start_supervised(health, body, stop, initial_backoff=5)
    await _until(lambda: _true(health.restarts == 1), timeout=5, what="the first failure")
    assert health.state == "restarting" and not health.healthy
    assert health.as_dict()["last_error"] == "RuntimeError: cannot connect"
    stop.set()
    await asyncio.wait_for(task, 5)
    assert health.as_dict()["state"] == "stopped" and health.healthy

    class Fatal(BaseException):
        """Not an Exception: the supervisor does not catch it, so its task ends."""

    async def fatal(_: LoopHealth) -> None:
        raise Fatal("interpreter shutting down")

    dead = LoopHealth("fatal")
    with caplog.at_level(logging.CRITICAL, logger="billing_remediation.loops"):
        task = start_supervised(dead, fatal, asyncio.Event())
        with pytest.raises(Fatal):
            await task
        await asyncio.sleep(0)  # done callbacks run on the next loop iteration
    assert dead.state == "dead" and not dead.healthy
    assert "fatal is dead: Fatal: interpreter shutting down" in caplog.text


async def _true(value: bool) -> bool:
    return value


async def _platform_status(world: World) -> tuple[int, str]:
    env = {**os.environ, "PLATFORM_PORT": str(world.settings.platform_port)}
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "remediate"),
        "platform",
        "status",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return int(proc.returncode or 0), out.decode()


async def test_platform_status_shows_a_failing_worker_loop_and_exits_1(world: World) -> None:
    async def running() -> bool:
        loops = (await _health(world))[1]["loops"]
        return all(loop["state"] == "running" for loop in loops.values())

    await _until(running, what="the loops' first round")
    code, out = await _platform_status(world)
    assert code == 0, out
    assert out.startswith("platform: ok") and "control mode" not in out
    # A crashed worker (as in the incident) keeps its loop alive; status says what it does not do.
    await world.db.execute("UPDATE billing.worker_control SET mode = 'crashed'")
    code, out = await _platform_status(world)
    assert code == 0 and "billing worker control mode: crashed" in out, out
    await world.db.execute("UPDATE billing.worker_control SET mode = 'running'")
    assert re.search(r"billing_worker\s+running\s+restarts 0", out), out
    world.nats_server.stop()
    try:

        async def failing() -> bool:
            return (await _health(world))[0] == 503

        await _until(failing, what="/healthz to report the loops failing while NATS is down")
        code, out = await _platform_status(world)
        assert code == 1, out
        assert out.startswith("platform: FAILING")
        assert re.search(r"billing_worker\s+restarting\s+restarts [1-9].*last error: \w+", out), out
    finally:
        world.nats_server.start()

    async def recovered() -> bool:
        return (await _health(world))[0] == 200

    await _until(recovered, timeout=60, what="the loops to recover once NATS is back")
    code, out = await _platform_status(world)
    assert code == 0, out
