"""pytest fixtures for the DingTalk emulator.

Enable them in your root ``conftest.py``::

    pytest_plugins = ["gateway_dingtalk.emulator.fixture"]

(or, from a nested conftest.py, ``from gateway_dingtalk.emulator.fixture import dingtalk_emulator``).

* ``dingtalk_emulator``: a started :class:`DingTalkEmulator` with the default app
  (``ding-app-id`` / ``ding-app-secret``) and a template ``emulator-ai-card.schema``, closed after
  the test.
* ``dingtalk_emulator_factory``: ``await factory(**kwargs)`` starts emulators with your own
  settings; all are closed after the test.

Both are function-scoped async fixtures (pytest-asyncio).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gateway.emulation import started_emulators
from gateway_dingtalk.emulator._server import DingTalkEmulator

try:
    import pytest_asyncio

    _async_fixture: Any = pytest_asyncio.fixture
except ImportError:  # pragma: no cover - plain pytest (e.g. with anyio's plugin)
    _async_fixture = pytest.fixture

__all__ = ["DEFAULT_TEMPLATE", "dingtalk_emulator", "dingtalk_emulator_factory"]

#: The template the ``dingtalk_emulator`` fixture knows, with common AI card variables.
DEFAULT_TEMPLATE = "emulator-ai-card.schema"
DEFAULT_TEMPLATE_VARIABLES = frozenset(
    {"content", "msgContent", "flowStatus", "title", "config", "feedback", "status", "error"}
)

EmulatorFactory = Callable[..., Awaitable[DingTalkEmulator]]


def _emulator(**kwargs: Any) -> DingTalkEmulator:
    kwargs.setdefault("templates", {DEFAULT_TEMPLATE: DEFAULT_TEMPLATE_VARIABLES})
    return DingTalkEmulator(**kwargs)


@_async_fixture
async def dingtalk_emulator_factory() -> AsyncIterator[EmulatorFactory]:
    async with started_emulators(_emulator) as start:
        yield start


@_async_fixture
async def dingtalk_emulator(
    dingtalk_emulator_factory: EmulatorFactory,
) -> DingTalkEmulator:
    return await dingtalk_emulator_factory()
