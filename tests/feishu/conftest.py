"""Feishu tests: the emulator's fixtures (``feishu_emulator``, ``feishu_emulator_factory``).

``pytest_plugins`` is only allowed in the root conftest, so the fixtures are imported here.
"""

from gateway_feishu.emulator.fixture import feishu_emulator, feishu_emulator_factory

__all__ = ["feishu_emulator", "feishu_emulator_factory"]
