"""``gateway new TYPE NAME``: write a commented instance file from a driver's settings schema.

Required settings and every secret become ``${NAME_KEY}`` placeholders filled from the environment (or
the ``.env`` file beside the instances), so the file can be committed without credentials; optional
settings are written commented out with their defaults and help text.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Any

import attrs

from gateway.config.instance import (
    AccessSettings,
    ConversationSettings,
    ReconnectSettings,
    ReplySettings,
)
from gateway.config.schema import describe_type, field_help
from gateway.secrets import Secret

__all__ = ["render_instance"]


def env_name(instance: str, key: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", f"{instance}_{key}").strip("_").upper()


def render_instance(
    *, name: str, driver_type: str, driver_class: type[Any], agent_type: str, agent_class: type[Any]
) -> str:
    lines = [
        f"# Instance {name!r}: the {driver_class.title or driver_type} driver answered by the "
        f"{agent_type!r} agent.",
        f"# {driver_class.description}" if driver_class.description else "",
        "# Values like ${VAR} come from the environment or from the .env file beside this file.",
        "# Check it with `gateway check`; start it with `gateway run`.",
        "",
        f"type = {_toml(driver_type)}",
        "enabled = true",
        "",
        "[settings]",
        *_table(name, driver_class.settings_class),
        "",
        "[agent]",
        f"type = {_toml(agent_type)}",
        *_table(name, agent_class.settings_class, prefix="agent"),
    ]
    for title, cls in (
        ("reply", ReplySettings),
        ("conversation", ConversationSettings),
        ("reconnect", ReconnectSettings),
        ("access", AccessSettings),
    ):
        lines += ["", f"[{title}]", *_table(name, cls)]
    return "\n".join(line for i, line in enumerate(lines) if line or i > 2) + "\n"


def _table(instance: str, cls: type[Any], prefix: str = "") -> list[str]:
    lines: list[str] = []
    attrs.resolve_types(cls)
    for field in attrs.fields(cls):
        if not field.init:
            continue
        key = field.alias
        help_text = field_help(field)
        expected = describe_type(field.type)
        lines.append(f"# {help_text} ({expected})" if help_text else f"# {expected}")
        secret = field.type is Secret or "Secret" in str(field.type)
        default = _default(field)
        # Metadata "ask": optional to the schema but needed in practice (e.g. a template id).
        if secret or default is attrs.NOTHING or field.metadata.get("ask"):
            variable = env_name(instance, f"{prefix}_{key}" if prefix else key)
            lines.append(f'{key} = "${{{variable}}}"')
        elif default is None:
            lines.append(f"# {key} =    (not set by default)")
        else:
            lines.append(f"# {key} = {_toml(default)}")
    return lines


def _default(field: attrs.Attribute[Any]) -> Any:
    default = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return default.factory()  # type: ignore[union-attr]
    return default


def _toml(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))
