"""The operations endpoint end to end: the real ``gateway run`` in a subprocess, real HTTP requests
to /healthz, /readyz, /v1/instances and /metrics, and ``gateway status`` against it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_cli import echo_instance, setup_folder, start_gateway

from gateway_testkit.process import (
    EchoClient,
    GatewayProcess,
    GatewayProcesses,
    free_port,
    run_cli,
)


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[GatewayProcesses]:
    with GatewayProcesses(tmp_path) as processes:
        yield processes


async def get(url: str) -> tuple[int, Any, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(url) as response:
            text = await response.text()
            body = await response.json() if "json" in response.content_type else None
            return response.status, body, text


async def wait_until(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            result = await check()
            if result:
                return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {check}")
        await asyncio.sleep(0.05)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def start(
    gateways: GatewayProcesses, root: Path, instances: dict[str, str], http: str = ""
) -> tuple[GatewayProcess, str]:
    setup_folder(root, instances, gateway_toml=http or "[http]\nport = 0\n")
    gateway = start_gateway(gateways, root)
    stderr = await gateway.wait_log("http endpoint listening on http://")
    line = next(ln for ln in stderr.splitlines() if "http endpoint listening on" in ln)
    return gateway, line.rsplit(" ", 1)[1]


async def test_health_ready_instances_metrics_and_status(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    port = free_port()
    gateway, base = await start(gateways, tmp_path, {"bot": echo_instance(port)})
    assert base.startswith("http://127.0.0.1:") and not base.endswith(":0")

    assert (await get(f"{base}/healthz"))[:2] == (200, {"status": "ok"})

    async def ready() -> Any:
        status, body, _ = await get(f"{base}/readyz")
        return body if status == 200 else None

    body = await wait_until(ready)
    assert body["instances"] == {"bot": "connected"}

    status, body, _ = await get(f"{base}/v1/instances")
    assert status == 200
    bot = body["instances"]["bot"]
    assert bot["driver"] == "echo" and bot["state"] == "connected"
    assert isinstance(bot["connected_since"], float)
    for key in ("last_frame", "reconnects", "in_flight", "denied", "last_error"):
        assert key in bot
    assert bot["reconnects"] == 0 and bot["in_flight"] == 0 and bot["denied"] == 0

    received = ("gateway_messages_total", (("instance", "bot"), ("outcome", "received")))
    answered = ("gateway_messages_total", (("instance", "bot"), ("outcome", "answered")))
    answer_count = ("gateway_agent_answer_seconds_count", (("instance", "bot"),))
    first_count = ("gateway_agent_first_chunk_seconds_count", (("instance", "bot"),))
    before = samples((await get(f"{base}/metrics"))[2])
    assert before.get(received, 0) == 0
    assert before[("gateway_in_flight_turns", (("instance", "bot"),))] == 0
    assert before[("gateway_reconnects_total", (("instance", "bot"),))] == 0

    async with EchoClient(port) as client:
        await client.ask("hello metrics", "m1")
        assert (await client.ask("hello metrics", "m1"))[0][0] == "duplicate"

    async def counted() -> Any:
        found = samples((await get(f"{base}/metrics"))[2])
        return found if found.get(answered) == 1 else None

    after = await wait_until(counted)
    assert after[received] == 1
    assert after[("gateway_messages_total", (("instance", "bot"), ("outcome", "duplicate")))] == 1
    assert after[answer_count] == 1 and after[first_count] == 1

    result = await asyncio.to_thread(run_cli, "status", base, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["INSTANCE", "DRIVER", "STATE"]
    assert lines[1].split()[:3] == ["bot", "echo", "connected"]

    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()


async def test_readyz_503_when_an_instance_cannot_connect(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    good = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bad = taken.getsockname()[1]
        instances = {"good": echo_instance(good), "bad": echo_instance(bad)}
        gateway, base = await start(gateways, tmp_path, instances)

        async def failing() -> Any:
            _, body, _ = await get(f"{base}/v1/instances")
            bad_view = body["instances"]["bad"]
            good_ok = body["instances"]["good"]["state"] == "connected"
            return body if good_ok and bad_view["last_error"] else None

        body = await wait_until(failing)
        assert body["instances"]["bad"]["state"] != "connected"
        status, ready, _ = await get(f"{base}/readyz")
        assert status == 503
        assert ready["instances"]["good"] == "connected"
        assert ready["instances"]["bad"] != "connected"
    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()


async def test_http_flag_overrides_the_file_and_no_http_disables_it(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    setup_folder(tmp_path, {}, gateway_toml="[http]\nenabled = false\n")
    port = free_port()
    gateway = gateways.start(
        "run",
        "--instances",
        tmp_path / "instances",
        "--config",
        tmp_path / "gateway.toml",
        "--http",
        f"127.0.0.1:{port}",
        cwd=tmp_path,
    )
    await gateway.wait_log(f"http endpoint listening on http://127.0.0.1:{port}")
    assert (await get(f"http://127.0.0.1:{port}/readyz"))[0] == 200  # no instance: ready
    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()

    silent = gateways.start(
        "run",
        "--instances",
        tmp_path / "instances",
        "--config",
        tmp_path / "gateway.toml",
        "--http",
        f"127.0.0.1:{port}",
        "--no-http",
        cwd=tmp_path,
    )
    assert await silent.wait_exit(10) == 2  # mutually exclusive

    quiet = gateways.start(
        "run",
        "--instances",
        tmp_path / "instances",
        "--no-http",
        cwd=tmp_path,
    )
    await quiet.wait_log("gateway running")
    assert "http endpoint" not in quiet.stderr
    quiet.send(signal.SIGTERM)
    assert await quiet.wait_exit(10) == 0, quiet.describe()


def test_status_unreachable_exits_1(tmp_path: Path) -> None:
    port = free_port()
    result = run_cli("status", f"http://127.0.0.1:{port}", cwd=tmp_path)
    assert result.returncode == 1
    assert f"cannot get the status from http://127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
