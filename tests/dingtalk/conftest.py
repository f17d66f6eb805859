"""DingTalk tests: the emulator's fixtures (``dingtalk_emulator``, ``dingtalk_emulator_factory``), and
for the tests that run the real ``gateway`` command: an app of their own (``app``, secret
:data:`SECRET`) and an emulator knowing it (``emu``); the process starter (``gateways``) is the
root conftest's.

``pytest_plugins`` is only allowed in the root conftest, so the fixtures are imported here.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import pytest

from gateway_dingtalk.emulator import DingTalkEmulator
from gateway_dingtalk.emulator.fixture import dingtalk_emulator, dingtalk_emulator_factory
from gateway_testkit.dingtalk import TEMPLATE, TEMPLATE_VARIABLES

__all__ = ["SECRET", "app", "dingtalk_emulator", "dingtalk_emulator_factory", "emu"]

#: the client secret of ``app`` (a test scans logs for it)
SECRET = "cli-dt-secret-94b1e0c3"


@pytest.fixture
def app() -> str:
    return f"dingcli{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def emu(
    app: str, dingtalk_emulator_factory: Callable[..., Awaitable[DingTalkEmulator]]
) -> DingTalkEmulator:
    return await dingtalk_emulator_factory(
        apps={app: SECRET}, templates={TEMPLATE: TEMPLATE_VARIABLES}, ack_timeout=2.0
    )
