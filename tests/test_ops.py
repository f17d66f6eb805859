"""The operations endpoint end to end: the real ``gateway run`` in a subprocess, real HTTP requests
to /healthz, /readyz, /v1/instances and /metrics, and ``gateway status`` against it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_cli import TEN_WORDS, echo_instance, setup_folder, start_gateway

from gateway.metrics import API_CALL_OUTCOMES, MESSAGE_OUTCOMES
from gateway_testkit.process import (
    EchoClient,
    GatewayProcess,
    GatewayProcesses,
    free_port,
    loopback_env,
    run_cli,
)


def memory_instance(settings: str = "") -> str:
    """An instance of the test kit's in-memory driver (connects at once; see its test seams)."""
    return f'type = "memory"\n\n[settings]\n{settings}\n\n[agent]\ntype = "echo"\n'


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


async def test_errors_are_json_and_one_instance_can_be_read(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    port = free_port()
    gateway, base = await start(gateways, tmp_path, {"bot": echo_instance(port)})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(f"{base}/no/such/thing") as response:
            assert response.status == 404 and response.content_type == "application/json"
            assert (await response.json()) == {"error": "no such endpoint: /no/such/thing"}
        async with session.post(f"{base}/healthz") as response:
            assert response.status == 405 and response.content_type == "application/json"
            assert "GET" in response.headers["Allow"]
            assert "POST is not allowed on /healthz" in (await response.json())["error"]
        async with session.get(f"{base}/v1/instances/bot/messages") as response:
            assert response.status == 405 and response.headers["Allow"] == "POST"
        async with session.get(f"{base}/v1/instances/nobody") as response:
            assert response.status == 404
            assert (await response.json()) == {"error": "no instance named 'nobody'"}

    async def connected() -> Any:
        status, body, _ = await get(f"{base}/v1/instances/bot")
        return body if status == 200 and body["state"] == "connected" else None

    one = await wait_until(connected)
    _, listing, _ = await get(f"{base}/v1/instances")
    assert one == listing["instances"]["bot"] and one["driver"] == "echo"
    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()


async def test_every_series_exists_at_zero_before_traffic(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    gateway, base = await start(gateways, tmp_path, {"bot": echo_instance(free_port())})
    text = (await get(f"{base}/metrics"))[2]
    found = samples(text)
    for outcome in MESSAGE_OUTCOMES:
        key = ("gateway_messages_total", (("instance", "bot"), ("outcome", outcome)))
        assert found[key] == 0, outcome
    for outcome in API_CALL_OUTCOMES:
        key = ("gateway_platform_api_calls_total", (("instance", "bot"), ("outcome", outcome)))
        assert found[key] == 0, outcome
    for histogram in ("gateway_agent_first_chunk_seconds", "gateway_agent_answer_seconds"):
        assert found[(f"{histogram}_count", (("instance", "bot"),))] == 0
    assert {"sent", "send_failed"} <= set(MESSAGE_OUTCOMES)
    help_line = next(ln for ln in text.splitlines() if ln.startswith("# HELP gateway_messages_"))
    assert "sent" in help_line and "send_failed" in help_line
    # Without the *_created series (a timestamp per series, unused in the text format).
    assert not [name for name, _ in found if name.endswith("_created")], text
    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()


async def test_reload_keeps_stopping_and_failed_instances_visible(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    """An instance draining during a reload, or whose start failed, stays in /readyz (503) and
    /v1/instances until it is gone or running; a removed instance's metrics go with it, and its
    open replies say why they end."""
    steady, leaving, changing = free_port(), free_port(), free_port()
    gateway, base = await start(
        gateways,
        tmp_path,
        {
            "steady": echo_instance(steady),
            "leaving": echo_instance(leaving, delay=0.5),
            "changing": echo_instance(changing, delay=0.5),
        },
        http="shutdown_grace = 2.0\n[http]\nport = 0\n",
    )

    async def readiness(check: Any) -> Any:
        async def probe() -> Any:
            status, body, _ = await get(f"{base}/readyz")
            return (status, body["instances"]) if check(body["instances"]) else None

        return await wait_until(probe)

    await readiness(lambda states: set(states.values()) == {"connected"})
    folder = tmp_path / "instances"
    async with EchoClient(leaving) as gone, EchoClient(changing) as change:
        async with (
            gone.post(TEN_WORDS, "g1") as g1,
            change.post(TEN_WORDS, "c1") as c1,
        ):
            await g1.until("update")
            await c1.until("update")
            async with gone.post("queued behind g1", "g2") as g2:  # same session: waits
                await g2.until("thinking")
                (folder / "leaving.toml").unlink()
                (folder / "changing.toml").write_text(echo_instance(changing, delay=0.05))
                (folder / "broken.toml").write_text(
                    memory_instance('init_error = "the platform said no"')
                )
                gateway.send(signal.SIGHUP)

                status, states = await readiness(lambda s: s.get("leaving") == "stopping")
                assert status == 503 and states["changing"] == "stopping", states
                _, view, _ = await get(f"{base}/v1/instances/leaving")
                assert view["state"] == "stopping"
                g1_events, g2_events, c1_events = (
                    await g1.rest(),
                    await g2.rest(),
                    await c1.rest(),
                )

    # Interrupted after the grace period, each reply saying why (not "the gateway is stopping").
    for events in (g1_events, g2_events):
        assert events[-1][0] == "error", events
        assert "this bot has been switched off" in str(events[-1][1]["error"])
    assert g1_events[-1][1]["text"], "the text so far is kept"
    assert c1_events[-1][0] == "error", c1_events
    assert "this bot is being reconfigured" in str(c1_events[-1][1]["error"])

    stderr = await gateway.wait_log("reload: ")
    assert "reload: stopped leaving; restarted changing; failed broken; 1 unchanged" in stderr
    status, states = await readiness(lambda s: s.get("changing") == "connected")
    assert status == 503 and states == {
        "broken": "failed",
        "changing": "connected",
        "steady": "connected",
    }
    _, view, _ = await get(f"{base}/v1/instances/broken")
    assert view["state"] == "failed" and view["driver"] == "memory"
    assert "the platform said no" in view["last_error"]
    found = samples((await get(f"{base}/metrics"))[2])
    assert not [key for key in found if ("instance", "leaving") in key[1]]
    assert found[("gateway_instance_connected", (("instance", "broken"),))] == 0
    assert found[("gateway_messages_total", (("instance", "changing"), ("outcome", "received")))]

    (folder / "broken.toml").write_text(memory_instance())
    gateway.send(signal.SIGHUP)
    await gateway.wait_log("reload: started broken; 2 unchanged")
    await readiness(lambda s: set(s.values()) == {"connected"} and len(s) == 3)
    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()


async def test_status_finds_the_endpoint_through_gateway_toml(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    """What the container's health check runs: ``gateway status --config``, the address coming
    from the same file (and its variables) as the gateway's own."""
    port = free_port()
    toml = '[http]\nhost = "${GATEWAY_HTTP_HOST:-0.0.0.0}"\nport = "${GATEWAY_HTTP_PORT:-8780}"\n'
    setup_folder(tmp_path, {}, gateway_toml=toml)
    config = tmp_path / "gateway.toml"
    env = loopback_env({"GATEWAY_HTTP_HOST": "127.0.0.1", "GATEWAY_HTTP_PORT": str(port)})
    gateway = start_gateway(gateways, tmp_path, env=env)
    await gateway.wait_log(f"http endpoint listening on http://127.0.0.1:{port}")

    for args in (("--config", config), ()):  # ./gateway.toml by default
        result = await asyncio.to_thread(run_cli, "status", *args, cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        assert "(no instance running)" in result.stdout

    # A wildcard bind address is reached through loopback.
    wildcard = loopback_env({"GATEWAY_HTTP_PORT": str(free_port())}, drop=["GATEWAY_HTTP_HOST"])
    result = run_cli("status", cwd=tmp_path, env=wildcard)
    assert result.returncode == 1
    assert f"cannot get the status from http://127.0.0.1:{wildcard['GATEWAY_HTTP_PORT']}" in (
        result.stderr
    )
    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()


@pytest.mark.parametrize("url", ["not-a-url", "ftp://127.0.0.1:8780", "http://:8780", "http://h:x"])
def test_status_with_an_invalid_url_says_so(tmp_path: Path, url: str) -> None:
    result = run_cli("status", url, cwd=tmp_path)
    assert result.returncode == 2, result
    assert f"gateway: invalid URL {url!r}: expected http://HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr


async def test_an_instance_that_cannot_start_is_failed_and_the_others_run(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    """One broken bot at start-up does not keep the others offline: it is listed as failed
    (``/readyz`` 503, the error in ``/v1/instances``) and the gateway serves the rest."""
    port = free_port()
    gateway, base = await start(
        gateways,
        tmp_path,
        {"bot": echo_instance(port), "broken": memory_instance('init_error = "no such thing"')},
    )

    async def both_known() -> Any:
        status, body, _ = await get(f"{base}/readyz")
        states = body["instances"]
        return (status, states) if states.get("bot") == "connected" else None

    status, states = await wait_until(both_known)
    assert status == 503 and states["broken"] == "failed", states
    _, view, _ = await get(f"{base}/v1/instances/broken")
    assert "no such thing" in view["last_error"], view
    async with EchoClient(port) as client, client.post("still here", "m1") as stream:
        events = await stream.rest()
    assert events[-1][0] == "final", events
    assert gateway.returncode is None
    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()
