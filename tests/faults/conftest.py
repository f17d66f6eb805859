"""The fault-injection suite: the real core and a real driver against a platform that misbehaves.

Every test here is written against :class:`gateway_testkit.harness.FaultInjection` only, so every
driver whose harness implements it runs the same faults: add it to ``HARNESSES`` (one line).
Figures a test measures (reconnect times...) are attached to the report with ``record_property``
and printed at the end of the run; nothing is asserted on timing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ProcessSettings, load_instance
from gateway.plugins import PluginRegistry
from gateway.runtime import Gateway, InstanceRuntime
from gateway.supervisor import InstanceState
from gateway_testkit.dingtalk import DingTalkHarness
from gateway_testkit.feishu import FeishuHarness
from gateway_testkit.harness import FaultInjection, instance_document

from ._support import Start

HARNESSES: dict[str, Callable[[], FaultInjection]] = {
    "dingtalk-stream": DingTalkHarness,
    "feishu": FeishuHarness,
}

REGISTRY = PluginRegistry.discover()
ECHO = {"type": "echo", "delay": 0}


@pytest.fixture(params=sorted(HARNESSES))
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[FaultInjection]:
    platform = HARNESSES[request.param]()
    await platform.start()
    try:
        yield platform
    finally:
        await platform.close()


@pytest.fixture
async def gateway(harness: FaultInjection, tmp_path: Path) -> AsyncIterator[Gateway]:
    # Depends on ``harness`` so that the gateway is closed first, while the platform still
    # answers: a platform gone before the gateway would add faults nobody asked for.
    gw = await Gateway.open(ProcessSettings(state_dir=str(tmp_path / "state"), shutdown_grace=2.0))
    yield gw
    await gw.close(grace=0.5)


@pytest.fixture
def start(gateway: Gateway, harness: FaultInjection, tmp_path: Path) -> Start:
    """``await start(agent, conversation={...}, ...)``: the instance running in this process, once
    connected; the tables are merged over :func:`instance_document`'s."""

    async def start(agent: dict[str, Any] | None = None, **tables: Any) -> InstanceRuntime:
        path = tmp_path / f"{harness.instance}.json"
        path.write_text(json.dumps(instance_document(harness, agent or ECHO, **tables)))
        runtime = gateway.start(load_instance(path, REGISTRY, env={}))
        assert runtime is not None
        async with asyncio.timeout(10):
            while runtime.status.state is not InstanceState.CONNECTED:
                await asyncio.sleep(0.01)
        return runtime

    return start


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print what the fault tests measured (their ``record_property`` figures)."""
    lines = [
        f"{report.nodeid}: {name} = {value}"
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", "") == "call" and "faults" in getattr(report, "nodeid", "")
        for name, value in getattr(report, "user_properties", ())
    ]
    if lines:
        terminalreporter.section("fault-injection measurements")
        for line in lines:
            terminalreporter.write_line(line)
