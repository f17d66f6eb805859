"""The core in the test process, for a driver's end-to-end tests: a gateway, instances started
from a few tables, waiting for them to connect, and a slow disk.

Each driver's suite keeps what is its own (the emulator, its settings); the scaffolding around
them is here, so the DingTalk and Feishu suites start instances the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from gateway.config import ProcessSettings, load_instance
from gateway.models import Incoming
from gateway.plugins import PluginRegistry
from gateway.runtime import Gateway, InstanceRuntime
from gateway.supervisor import InstanceState

__all__ = ["ECHO", "Start", "instance_starter", "running_gateway", "slow_store", "wait_connected"]

#: An agent that answers at once with the question.
ECHO: dict[str, Any] = {"type": "echo", "delay": 0}

#: ``await start(name=..., settings=..., agent=..., reply=..., connected=..., <table>=...)``
Start = Callable[..., Awaitable[InstanceRuntime]]


@contextlib.asynccontextmanager
async def running_gateway(state_dir: Path) -> AsyncIterator[Gateway]:
    """A gateway with its state in ``state_dir``; closed on the way out, quickly (a test's
    answers are short)."""
    gateway = await Gateway.open(ProcessSettings(state_dir=str(state_dir), shutdown_grace=1.0))
    try:
        yield gateway
    finally:
        await gateway.close(grace=0.2)


async def wait_connected(runtime: InstanceRuntime, timeout: float = 5.0) -> None:
    """Until ``runtime`` is connected; ``TimeoutError`` after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while runtime.status.state is not InstanceState.CONNECTED:
            await asyncio.sleep(0.01)


def instance_starter(
    gateway: Gateway,
    folder: Path,
    driver: str,
    settings: Mapping[str, Any],
    registry: PluginRegistry | None = None,
) -> Start:
    """``await start(...)`` writes ``folder/<name>.json`` for ``driver`` and starts it in
    ``gateway``, by default once connected.  ``settings`` are merged under the call's own, the
    echo agent answers unless ``agent`` is given, replies update every 50 ms, reconnects are
    fast; any other table (``conversation={...}``) goes in as given."""
    plugins = registry if registry is not None else PluginRegistry.discover()

    async def start(
        *,
        name: str = "bot",
        settings: dict[str, Any] | None = None,
        agent: dict[str, Any] | None = None,
        reply: dict[str, Any] | None = None,
        connected: bool = True,
        **tables: Any,
    ) -> InstanceRuntime:
        document = {
            "type": driver,
            "settings": {**base, **(settings or {})},
            "agent": agent or ECHO,
            "reply": {"update_interval": 0.05, **(reply or {})},
            "reconnect": {"initial_delay": 0.05, "max_delay": 0.5},
            **tables,
        }
        path = folder / f"{name}.json"
        path.write_text(json.dumps(document))
        runtime = gateway.start(load_instance(path, plugins, env={}))
        assert runtime is not None
        if connected:
            await wait_connected(runtime)
        return runtime

    base = dict(settings)
    return start


def slow_store(runtime: InstanceRuntime, delay: float) -> asyncio.Event:
    """Make ``runtime`` take ``delay`` s more to store each message (a busy disk: the commit takes
    its time).  The event is set when a message starts being stored."""
    deliver = runtime.deliver
    storing = asyncio.Event()

    async def slow_deliver(message: Incoming) -> bool:
        storing.set()
        stored = await deliver(message)
        await asyncio.sleep(delay)
        return stored

    runtime.deliver = slow_deliver  # type: ignore[method-assign]
    return storing
