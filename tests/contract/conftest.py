"""Runs the driver contract suite against every driver that has a platform harness.

Add a driver here (with its harness in ``gateway_testkit.harness`` or next to its emulator) and it runs
the same tests as echo.  Drivers are loaded through entry points, as installed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from gateway_testkit.dingtalk import DingTalkHarness
from gateway_testkit.feishu import FeishuHarness
from gateway_testkit.harness import EchoHarness, PlatformHarness

HARNESSES: dict[str, Callable[[], PlatformHarness]] = {
    "echo": EchoHarness,
    "dingtalk-stream": DingTalkHarness,
    "feishu": FeishuHarness,
}


@pytest.fixture(params=sorted(HARNESSES))
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[PlatformHarness]:
    platform = HARNESSES[request.param]()
    await platform.start()
    try:
        yield platform
    finally:
        await platform.close()
