"""DingTalk Stream-mode driver for imgateway (entry point ``dingtalk-stream``)."""

from gateway_dingtalk.driver import DingTalkDriver
from gateway_dingtalk.settings import DingTalkSettings

__all__ = ["DingTalkDriver", "DingTalkSettings"]
