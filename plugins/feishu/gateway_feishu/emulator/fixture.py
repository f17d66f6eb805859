"""pytest fixtures for the Feishu emulator.

Enable them in your root ``conftest.py``::

    pytest_plugins = ["gateway_feishu.emulator.fixture"]

(or, from a nested conftest.py, ``from gateway_feishu.emulator.fixture import feishu_emulator``).

* ``feishu_emulator``: a started :class:`FeishuEmulator` with the default app (``DEFAULT_APP`` /
  ``DEFAULT_SECRET``), closed after the test.
* ``feishu_emulator_factory``: ``await factory(**kwargs)`` starts emulators with your own settings
  (e.g. ``ack_timeout=0.5``); all are closed after the test.

Both are function-scoped async fixtures (pytest-asyncio).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gateway.emulation import started_emulators
from gateway_feishu.emulator._server import FeishuEmulator

try:
    import pytest_asyncio

    _async_fixture: Any = pytest_asyncio.fixture
except ImportError:  # pragma: no cover - plain pytest (e.g. with anyio's plugin)
    _async_fixture = pytest.fixture

__all__ = ["EmulatorFactory", "feishu_emulator", "feishu_emulator_factory"]

EmulatorFactory = Callable[..., Awaitable[FeishuEmulator]]


@_async_fixture
async def feishu_emulator_factory() -> AsyncIterator[EmulatorFactory]:
    async with started_emulators(FeishuEmulator) as start:
        yield start


@_async_fixture
async def feishu_emulator(feishu_emulator_factory: EmulatorFactory) -> FeishuEmulator:
    return await feishu_emulator_factory()
