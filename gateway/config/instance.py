"""Instance files: one ``*.toml`` or ``*.json`` per bot, binding a driver type to its settings and an agent.

::

    type = "echo"             # driver entry-point name
    enabled = true
    [settings]                # the driver's settings_class
    [agent]                   # type = agent entry-point name; the agent's settings beside it
    [reply]                   # pacing of streamed updates (ReplySettings)
    [conversation]            # sessions, busy policy, history, commands (ConversationSettings)
    [access]                  # who may talk to the bot, rate and input limits (AccessSettings)
    [reconnect]               # the supervisor's backoff (ReconnectSettings)

Everything is validated before anything connects and every problem is reported at once, each naming
the file and the key path.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from gateway.agent import Agent
from gateway.config.envsubst import environment, substitute
from gateway.config.schema import MAX_DEPTH, Problems, Unresolved, structure, too_deep
from gateway.driver import Driver
from gateway.errors import ConfigError, ConfigProblem, PluginError
from gateway.plugins import PluginRegistry

__all__ = [
    "INSTANCE_NAME",
    "AccessSettings",
    "ConversationSettings",
    "InstanceConfig",
    "ReconnectSettings",
    "ReplySettings",
    "load_instance",
    "load_instances",
]

#: What an instance name (its file name without extension) may be.
INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SUFFIXES = (".toml", ".json")
_ge0: Any = attrs.validators.ge(0)  # shared by int and float fields


@attrs.frozen
class ReplySettings:
    """How streamed answers are shown (the core's pacing; drivers may add their own limits)."""

    update_interval: float = attrs.field(
        default=1.0,
        validator=_ge0,
        metadata={"help": "minimum seconds between two visible updates of one reply"},
    )
    max_updates: int = attrs.field(
        default=0,
        validator=_ge0,
        metadata={
            "help": "most updates per reply, the last kept for the final text; 0 = no cap "
            "(the reference design uses 20, which freezes long answers)"
        },
    )
    update_every_chunks: int = attrs.field(
        default=0,
        validator=_ge0,
        metadata={"help": "also update after this many chunks, before the interval; 0 = off"},
    )
    feedback: bool = attrs.field(
        default=True, metadata={"help": "attach feedback buttons to final replies if supported"}
    )


@attrs.frozen
class ConversationSettings:
    session_key: Literal["sender", "conversation", "sender_in_conversation"] = attrs.field(
        default="sender",
        metadata={
            "help": 'what "one turn at a time" is keyed on: the sender, the conversation, or both'
        },
    )
    concurrency: int = attrs.field(
        default=16,
        validator=attrs.validators.ge(1),
        metadata={"help": "turns answered at the same time by this instance"},
    )
    timeout: float = attrs.field(
        default=300.0,
        validator=attrs.validators.gt(0),
        metadata={"help": "seconds an agent may take for a whole answer"},
    )
    idle_timeout: float = attrs.field(
        default=120.0,
        validator=attrs.validators.gt(0),
        metadata={"help": "seconds an agent may stay silent between two chunks"},
    )
    empty_reply: str = attrs.field(
        default="Please write your question after mentioning me.",
        metadata={"help": "the answer to a message with no text and no attachment (a bare @)"},
    )
    attachments_reply: str = attrs.field(
        default="Sorry, I can only read text messages for now.",
        metadata={
            "help": "the answer when a message had only attachments and the agent said nothing"
        },
    )
    busy: Literal["queue", "collect", "drop", "interrupt"] = attrs.field(
        default="queue",
        metadata={
            "help": "a message arriving while its session is answering: queue (answer in order), "
            "collect (merge into the next turn), drop (reply busy_reply), interrupt (stop the "
            "running answer, then answer this one)"
        },
    )
    busy_reply: str = attrs.field(
        default="I am still answering your previous message; please wait for it.",
        metadata={"help": "the answer to a message dropped by busy = 'drop'"},
    )
    history_turns: int = attrs.field(
        default=10,
        validator=_ge0,
        metadata={"help": "earlier turns of the session passed to the agent; 0 = none"},
    )
    history_chars: int = attrs.field(
        default=8000,
        validator=_ge0,
        metadata={"help": "at most this many characters of history (oldest turns dropped first)"},
    )
    history_max_age: float = attrs.field(
        default=7 * 86400.0,
        validator=attrs.validators.gt(0),
        metadata={"help": "seconds after which a turn is forgotten"},
    )
    command_prefix: str = attrs.field(
        default="/",
        metadata={"help": "prefix of the built-in commands (/reset, /help, /stop); '' = none"},
    )
    help_text: str = attrs.field(
        default="I answer your messages with an AI agent. Commands: /reset forgets our "
        "conversation, /stop cancels the answer in progress, /help shows this text.",
        metadata={"help": "the answer to /help"},
    )


@attrs.frozen
class AccessSettings:
    """Who may talk to this instance.  Patterns are globs (``fnmatch``) on ids."""

    users_allow: list[str] = attrs.field(
        factory=list, metadata={"help": "sender ids allowed (where a policy is 'allowlist')"}
    )
    users_deny: list[str] = attrs.field(
        factory=list, metadata={"help": "sender ids always refused"}
    )
    conversations_allow: list[str] = attrs.field(
        factory=list, metadata={"help": "group conversation ids allowed (group = 'allowlist')"}
    )
    conversations_deny: list[str] = attrs.field(
        factory=list, metadata={"help": "conversation ids always refused"}
    )
    single: Literal["open", "allowlist", "disabled"] = attrs.field(
        default="open",
        metadata={"help": "one-to-one chats: open, allowlist (users_allow), disabled"},
    )
    group: Literal["open", "allowlist", "disabled"] = attrs.field(
        default="open",
        metadata={"help": "group chats: open, allowlist (conversations_allow), disabled"},
    )
    require_mention: bool = attrs.field(
        default=False,
        metadata={
            "help": "in groups, answer only messages that mention the bot (if the platform says)"
        },
    )
    admins: list[str] = attrs.field(
        factory=list, metadata={"help": "sender ids exempt from the allow lists and the rate limit"}
    )
    denied_reply: str = attrs.field(
        default="Sorry, you are not allowed to use this bot.",
        metadata={"help": "the answer to a refused message; '' = no answer"},
    )
    rate_limit: int = attrs.field(
        default=0,
        validator=_ge0,
        metadata={"help": "messages one sender may send per rate_window; 0 = no limit"},
    )
    rate_window: float = attrs.field(
        default=60.0, validator=attrs.validators.gt(0), metadata={"help": "seconds of the window"}
    )
    rate_reply: str = attrs.field(
        default="You are sending messages too quickly; please wait a moment.",
        metadata={"help": "the answer to a message over the rate limit"},
    )
    max_input_chars: int = attrs.field(
        default=0,
        validator=_ge0,
        metadata={"help": "longest message passed to the agent; 0 = no limit"},
    )
    input_overflow: Literal["truncate", "refuse"] = attrs.field(
        default="truncate",
        metadata={"help": "longer messages are truncated (with a note) or refused"},
    )


@attrs.frozen
class ReconnectSettings:
    initial_delay: float = attrs.field(
        default=1.0, validator=_ge0, metadata={"help": "first backoff delay after a failure"}
    )
    max_delay: float = attrs.field(
        default=60.0, validator=_ge0, metadata={"help": "backoff cap in seconds"}
    )
    healthy_after: float = attrs.field(
        default=30.0,
        validator=_ge0,
        metadata={
            "help": "a session up this long resets the backoff; shorter ones count as failures"
        },
    )


@attrs.frozen
class InstanceConfig:
    """One validated instance file."""

    name: str
    path: Path
    driver_type: str
    enabled: bool
    driver_class: type[Driver] = attrs.field(repr=False)
    settings: Any  # the driver's settings_class; None for a disabled instance with unset variables
    agent_type: str
    agent_class: type[Agent] = attrs.field(repr=False)
    agent_settings: Any
    reply: ReplySettings
    conversation: ConversationSettings
    reconnect: ReconnectSettings
    access: AccessSettings
    #: Changes whenever the file's meaning changes (after substitution), so a reload can tell which
    #: instances changed.
    fingerprint: str = attrs.field(repr=False)


def load_instances(
    folder: Path, registry: PluginRegistry, *, env: Mapping[str, str] | None = None
) -> list[InstanceConfig]:
    """Load and validate every instance file in ``folder``; raise ConfigError listing all problems."""
    if not folder.is_dir():
        raise ConfigError([ConfigProblem(str(folder), "", "instances folder not found")])
    env = environment(folder / ".env") if env is None else env
    problems: list[ConfigProblem] = []
    configs: list[InstanceConfig] = []
    seen: dict[str, Path] = {}
    files = sorted(p for p in folder.iterdir() if p.suffix in _SUFFIXES and p.is_file())
    for path in files:
        if path.stem in seen:
            problems.append(
                ConfigProblem(
                    str(path),
                    "",
                    f"duplicate instance name {path.stem!r} (also {seen[path.stem].name})",
                )
            )
            continue
        seen[path.stem] = path
        try:
            configs.append(load_instance(path, registry, env=env))
        except ConfigError as exc:
            problems.extend(exc.problems)
    problems.extend(_exclusive_conflicts(configs))
    if problems:
        raise ConfigError(problems)
    return configs


def load_instance(
    path: Path, registry: PluginRegistry, *, env: Mapping[str, str]
) -> InstanceConfig:
    file = str(path)
    found: Problems = []

    def fail() -> ConfigError:
        return ConfigError([ConfigProblem(file, key, message) for key, message in found])

    if not INSTANCE_NAME.fullmatch(path.stem):
        found.append(("", f"instance name {path.stem!r} must be letters, digits, '_', '.' or '-'"))
    data = _parse(path, found)
    if data is None:
        raise fail()

    known = {
        "type",
        "enabled",
        "description",
        "settings",
        "agent",
        "reply",
        "conversation",
        "reconnect",
        "access",
    }
    for key in data:
        if key not in known:
            found.append((str(key), f"unknown key (expected one of: {', '.join(sorted(known))})"))

    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        found.append(("enabled", "expected true or false"))
        enabled = True
    data = substitute(data, env, "", found, allow_missing=not enabled)

    driver_type = data.get("type")
    driver_class = _plugin(registry.driver, driver_type, "type", found)
    agent_table = data.get("agent", {"type": "echo"})
    agent_type = agent_table.get("type") if isinstance(agent_table, Mapping) else None
    if not isinstance(agent_table, Mapping):
        found.append(("agent", "expected a table with a 'type' key"))
        agent_class = None
    else:
        agent_class = _plugin(registry.agent, agent_type, "agent.type", found)

    settings = None
    if driver_class is not None:
        settings = structure(
            driver_class.settings_class, data.get("settings", {}), "settings", found
        )
    agent_settings = None
    if agent_class is not None and isinstance(agent_table, Mapping):
        own = {k: v for k, v in agent_table.items() if k != "type"}
        agent_settings = structure(agent_class.settings_class, own, "agent", found)
    reply = structure(ReplySettings, data.get("reply", {}), "reply", found)
    conversation = structure(
        ConversationSettings, data.get("conversation", {}), "conversation", found
    )
    reconnect = structure(ReconnectSettings, data.get("reconnect", {}), "reconnect", found)
    access = structure(AccessSettings, data.get("access", {}), "access", found)
    if not isinstance(data.get("description", ""), str):
        found.append(("description", "expected a string"))

    if found:
        raise fail()
    assert driver_class is not None and agent_class is not None
    assert reply is not None and conversation is not None and reconnect is not None
    assert access is not None
    return InstanceConfig(
        name=path.stem,
        path=path,
        driver_type=str(driver_type),
        enabled=enabled,
        driver_class=driver_class,
        settings=settings,
        agent_type=str(agent_type),
        agent_class=agent_class,
        agent_settings=agent_settings,
        reply=reply,
        conversation=conversation,
        reconnect=reconnect,
        access=access,
        fingerprint=_fingerprint(data),
    )


def _parse(path: Path, found: Problems) -> dict[str, Any] | None:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        found.append(("", f"cannot read: {exc.strerror}"))
        return None
    try:
        data = tomllib.loads(raw.decode()) if path.suffix == ".toml" else json.loads(raw)
    # RecursionError: arrays or tables nested deeper than the parser recurses.
    except (
        tomllib.TOMLDecodeError,
        json.JSONDecodeError,
        UnicodeDecodeError,
        RecursionError,
    ) as exc:
        found.append(("", f"not valid {path.suffix[1:].upper()}: {exc}"))
        return None
    if not isinstance(data, dict):
        found.append(("", "expected a table at the top level"))
        return None
    if too_deep(data):
        found.append(("", f"tables or arrays nested more than {MAX_DEPTH} levels deep"))
        return None
    return data


def _plugin(lookup: Any, name: Any, key: str, found: Problems) -> Any:
    if isinstance(name, Unresolved):
        found.append((key, f"the type cannot come from an unset variable ({name.variable})"))
        return None
    if not isinstance(name, str) or not name:
        found.append((key, "missing (expected the plugin's entry-point name)"))
        return None
    try:
        return lookup(name)
    except PluginError as exc:
        found.append((key, str(exc)))
        return None


def _exclusive_conflicts(configs: list[InstanceConfig]) -> list[ConfigProblem]:
    owners: dict[tuple[str, str], InstanceConfig] = {}
    problems = []
    for config in configs:
        if not config.enabled or config.settings is None:
            continue
        key = config.driver_class.exclusive_key(config.settings)
        if key is None:
            continue
        other = owners.setdefault((config.driver_type, key), config)
        if other is not config:
            problems.append(
                ConfigProblem(
                    str(config.path),
                    "settings",
                    f"connects the same {config.driver_type} app as {other.path.name}; two "
                    "connections of one app steal each other's messages (disable one)",
                )
            )
    return problems


def _fingerprint(data: Mapping[str, Any]) -> str:
    def default(value: Any) -> str:
        return repr(value)  # Unresolved; secrets never get here (raw strings, hashed below)

    text = json.dumps(data, sort_keys=True, default=default)
    return hashlib.sha256(text.encode()).hexdigest()
