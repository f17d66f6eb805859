"""Feishu/Lark driver for imgateway: the long connection (pbbp2 frames over a websocket), CardKit
streaming cards and card callbacks.  ``gateway_feishu.emulator`` is a local Feishu for tests."""

from gateway_feishu.driver import FeishuDriver
from gateway_feishu.settings import FeishuSettings

__all__ = ["FeishuDriver", "FeishuSettings"]
