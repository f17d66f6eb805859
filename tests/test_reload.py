"""Live reload: SIGHUP and ``gateway reload`` re-read the instances folder; the pidfile.

The real CLI in a subprocess against echo instances on free ports of 127.0.0.1; every process is
killed at teardown (the ``gateways`` fixture) and every wait has a deadline.  The last test drives
:meth:`Gateway.apply` directly with the in-memory driver.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.agents.echo import EchoAgent
from gateway.config import ProcessSettings
from gateway.config.instance import InstanceConfig, load_instance
from gateway.plugins import PluginRegistry
from gateway.runtime import Gateway
from gateway_testkit.memory import MemoryDriver
from gateway_testkit.process import (
    EchoClient,
    GatewayProcess,
    GatewayProcesses,
    free_port,
    run_cli,
)

pytestmark = pytest.mark.timeout(120)


def prefixed(port: int, prefix: str) -> str:
    """An echo instance file on 127.0.0.1:``port`` whose echo agent puts ``prefix`` first."""
    return f"""\
type = "echo"

[settings]
host = "127.0.0.1"
port = {port}
terminal = "off"

[agent]
type = "echo"
delay = 0.0
prefix = {json.dumps(prefix)}

[reply]
update_interval = 0.02
"""


def setup_folder(root: Path, instances: dict[str, str]) -> tuple[Path, Path]:
    folder = root / "instances"
    folder.mkdir(exist_ok=True)
    for name, text in instances.items():
        (folder / f"{name}.toml").write_text(text)
    config = root / "gateway.toml"
    config.write_text('state_dir = "state"\nshutdown_grace = 2.0\n')
    return folder, config


def start_gateway(gateways: GatewayProcesses, root: Path) -> GatewayProcess:
    return gateways.start(
        "run", "--instances", root / "instances", "--config", root / "gateway.toml", cwd=root
    )


def log_lines(text: str, *fragments: str) -> list[str]:
    return [line for line in text.splitlines() if all(f in line for f in fragments)]


async def final_text(client: EchoClient, text: str, message_id: str) -> str:
    events = await client.ask(text, message_id)
    assert events[-1][0] == "final", events
    return str(events[-1][1]["text"])


async def wait_down(port: int, timeout: float = 20.0) -> None:
    """Wait until nothing answers on ``port`` any more."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        writer.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"port {port} still answers after {timeout} s")
        await asyncio.sleep(0.05)


def hup(process: GatewayProcess) -> None:
    process.send(signal.SIGHUP)


@pytest.fixture
async def clients() -> AsyncIterator[list[EchoClient]]:
    made: list[EchoClient] = []
    yield made
    for client in made:
        await client.close()


async def test_sighup_starts_stops_restarts_and_keeps(
    tmp_path: Path, gateways: GatewayProcesses, clients: list[EchoClient]
) -> None:
    keep, gone, change, new = (free_port() for _ in range(4))
    folder, _ = setup_folder(
        tmp_path,
        {
            "keep": prefixed(keep, "K:"),
            "gone": prefixed(gone, "G:"),
            "change": prefixed(change, "old:"),
        },
    )
    gw = start_gateway(gateways, tmp_path)
    for port in (keep, gone, change):
        await gw.wait_http(f"http://127.0.0.1:{port}")
    k, c, n = EchoClient(keep), EchoClient(change), EchoClient(new)
    clients.extend([k, c, n])
    assert await final_text(k, "hi", "k1") == "K:hi"
    assert await final_text(c, "hi", "c1") == "old:hi"

    (folder / "gone.toml").unlink()
    (folder / "change.toml").write_text(prefixed(change, "new:"))
    (folder / "new.toml").write_text(prefixed(new, "N:"))
    hup(gw)
    stderr = await gw.wait_log("reload: ")
    await gw.wait_http(f"http://127.0.0.1:{new}")
    await wait_down(gone)

    summary = log_lines(stderr, "reload: ")
    assert summary and summary[-1].endswith(
        "reload: started new; stopped gone; restarted change; 1 unchanged"
    ), stderr
    assert log_lines(stderr, "[gone]", "stopped"), stderr
    assert await final_text(n, "hi", "n1") == "N:hi"
    assert await final_text(c, "hi", "c2") == "new:hi"
    # The unchanged instance was not restarted: its in-memory transcript still knows k1.
    status, body = await k.get("k1")
    assert status == 200 and body["state"] == "final", body
    assert await final_text(k, "again", "k2") == "K:again"
    # The restarted one lost its transcript (a new driver object).
    status, _ = await c.get("c1")
    assert status == 404


async def test_invalid_reload_is_rejected_whole(
    tmp_path: Path, gateways: GatewayProcesses, clients: list[EchoClient]
) -> None:
    one, two = free_port(), free_port()
    folder, _ = setup_folder(tmp_path, {"one": prefixed(one, "1:")})
    gw = start_gateway(gateways, tmp_path)
    await gw.wait_http(f"http://127.0.0.1:{one}")
    client = EchoClient(one)
    clients.append(client)

    # A valid new instance next to a broken change: nothing of it is applied.
    (folder / "two.toml").write_text(prefixed(two, "2:"))
    (folder / "one.toml").write_text(prefixed(one, "changed:") + "\nbogus_key = 1\n")
    hup(gw)
    stderr = await gw.wait_log("the running instances are unchanged")
    errors = log_lines(stderr, "reload rejected", "one.toml", "bogus_key")
    assert errors and "ERROR" in errors[0], stderr
    assert await final_text(client, "hi", "m1") == "1:hi"
    await wait_down(two, timeout=0.5)
    assert gw.returncode is None


async def test_gateway_reload_command_and_pidfile(
    tmp_path: Path, gateways: GatewayProcesses, clients: list[EchoClient]
) -> None:
    one, two = free_port(), free_port()
    folder, config = setup_folder(tmp_path, {"one": prefixed(one, "1:")})
    pidfile = tmp_path / "state" / "gateway.pid"

    # No gateway yet: reload fails readably.
    result = run_cli("reload", "--config", config, cwd=tmp_path)
    assert result.returncode == 1, result
    assert "no gateway is running" in result.stderr

    gw = start_gateway(gateways, tmp_path)
    await gw.wait_http(f"http://127.0.0.1:{one}")
    assert int(pidfile.read_text()) == gw.pid

    # A second gateway on the same state directory is refused.
    second = start_gateway(gateways, tmp_path)
    assert await second.wait_exit(30) == 2, second.describe()
    assert f"another gateway (pid {gw.pid})" in second.stderr
    assert int(pidfile.read_text()) == gw.pid

    (folder / "two.toml").write_text(prefixed(two, "2:"))
    result = run_cli("reload", "--config", config, cwd=tmp_path)
    assert result.returncode == 0, result
    await gw.wait_log("reload: started two; 1 unchanged")
    await gw.wait_http(f"http://127.0.0.1:{two}")
    client = EchoClient(two)
    clients.append(client)
    assert await final_text(client, "hi", "m1") == "2:hi"

    gw.send(signal.SIGTERM)
    assert await gw.wait_exit(30) == 0, gw.describe()
    assert not pidfile.exists()


async def test_stale_pidfile_is_replaced(tmp_path: Path, gateways: GatewayProcesses) -> None:
    port = free_port()
    setup_folder(tmp_path, {"one": prefixed(port, "")})
    pidfile = tmp_path / "state" / "gateway.pid"
    pidfile.parent.mkdir()
    # A pid that names no process (well above the usual pid_max, or reused: checked below).
    stale = 4_194_000
    try:
        os.kill(stale, 0)
    except ProcessLookupError:
        pass
    else:  # pragma: no cover
        pytest.skip("the made-up pid is in use")
    pidfile.write_text(f"{stale}\n")
    gw = start_gateway(gateways, tmp_path)
    await gw.wait_http(f"http://127.0.0.1:{port}")
    assert int(pidfile.read_text()) == gw.pid


# -- Gateway.apply, in process -------------------------------------------------------------------

REGISTRY = PluginRegistry.from_classes(drivers={"memory": MemoryDriver}, agents={"echo": EchoAgent})


@pytest.fixture
def configure(tmp_path: Path) -> Callable[..., InstanceConfig]:
    def make(name: str, prefix: str = "", enabled: bool = True) -> InstanceConfig:
        path = tmp_path / f"{name}.toml"
        path.write_text(
            f'type = "memory"\nenabled = {str(enabled).lower()}\n'
            f'[agent]\ntype = "echo"\ndelay = 0\nprefix = "{prefix}"\n'
            "[reply]\nupdate_interval = 0.0\n"
        )
        return load_instance(path, REGISTRY, env={})

    return make


async def test_apply(tmp_path: Path, configure: Callable[..., InstanceConfig]) -> None:
    gateway = await Gateway.open(
        ProcessSettings(state_dir=str(tmp_path / "state"), shutdown_grace=1.0)
    )
    try:
        first = await gateway.apply([configure("a"), configure("b"), configure("c")])
        assert first.started == ["a", "b", "c"] and not first.unchanged
        a, b, c = (gateway.instances[n] for n in "abc")

        result = await gateway.apply(
            [configure("a"), configure("b", prefix="x"), configure("c", enabled=False)]
        )
        assert (result.started, result.stopped, result.restarted, result.unchanged) == (
            [],
            ["c"],
            ["b"],
            ["a"],
        )
        assert result.summary() == "reload: stopped c; restarted b; 1 unchanged"
        assert gateway.instances["a"] is a
        assert gateway.instances["b"] is not b
        assert "c" not in gateway.instances
        assert isinstance(c.driver, MemoryDriver) and c.driver.closed.is_set()
        assert isinstance(b.driver, MemoryDriver) and b.driver.closed.is_set()
        new_b = gateway.instances["b"].driver
        assert isinstance(new_b, MemoryDriver)
        async with asyncio.timeout(10):
            while not new_b.serves:
                await asyncio.sleep(0.005)
        await new_b.inject("hi", message_id="m1")
        channel = await new_b.wait_done("m1")
        assert channel is not None

        last = await gateway.apply([])
        assert sorted(last.stopped) == ["a", "b"] and not gateway.instances
    finally:
        await gateway.close(grace=0.5)
