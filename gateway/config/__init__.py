"""Configuration: instance files, the process-wide file, ``${VAR}`` substitution and validation."""

from gateway.config.instance import (
    AccessSettings,
    ConversationSettings,
    InstanceConfig,
    ReconnectSettings,
    ReplySettings,
    load_instance,
    load_instances,
)
from gateway.config.process import LogSettings, ProcessSettings, load_process_settings

__all__ = [
    "AccessSettings",
    "ConversationSettings",
    "InstanceConfig",
    "LogSettings",
    "ProcessSettings",
    "ReconnectSettings",
    "ReplySettings",
    "load_instance",
    "load_instances",
    "load_process_settings",
]
