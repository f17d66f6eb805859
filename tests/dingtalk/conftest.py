"""DingTalk tests: the emulator's fixtures (``dingtalk_emulator``, ``dingtalk_emulator_factory``).

``pytest_plugins`` is only allowed in the root conftest, so the fixtures are imported here.
"""

from gateway_dingtalk.emulator.fixture import dingtalk_emulator, dingtalk_emulator_factory

__all__ = ["dingtalk_emulator", "dingtalk_emulator_factory"]
