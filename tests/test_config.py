"""Instance files, process settings, ${VAR} substitution and every validation error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import attrs
import pytest

from gateway.agents.echo import EchoAgent
from gateway.config import load_instances, load_process_settings
from gateway.driver import Driver, ReplyChannel
from gateway.errors import ConfigError
from gateway.models import Incoming
from gateway.plugins import PluginRegistry
from gateway.secrets import Secret


@attrs.frozen
class AppSettings:
    client_id: str = attrs.field(metadata={"help": "the app's id"})
    client_secret: Secret
    port: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    ratio: float = 1.0
    verbose: bool = False
    mode: Literal["card", "markdown"] = "card"
    tags: list[str] = attrs.field(factory=list)
    endpoint: str | None = None


class AppDriver(Driver):
    title = "App"
    settings_class = AppSettings

    @classmethod
    def exclusive_key(cls, settings: Any) -> str | None:
        return str(settings.client_id)

    async def serve(self) -> None:  # pragma: no cover - never run here
        raise NotImplementedError

    def open_reply(self, message: Incoming) -> ReplyChannel:  # pragma: no cover
        raise NotImplementedError


REGISTRY = PluginRegistry.from_classes(drivers={"app": AppDriver}, agents={"echo": EchoAgent})
GOOD = """
type = "app"
[settings]
client_id = "id-1"
client_secret = "${APP_SECRET}"
port = 8080
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def problems(folder: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_instances(folder, REGISTRY, env=env or {})
    return [str(p) for p in caught.value.problems]


def test_valid_toml_instance(tmp_path: Path) -> None:
    write(tmp_path, "bot.toml", GOOD)
    [config] = load_instances(tmp_path, REGISTRY, env={"APP_SECRET": "s3cr3t-value"})
    assert config.name == "bot"
    assert config.enabled
    assert config.driver_class is AppDriver
    assert config.settings.port == 8080
    assert config.settings.client_secret.reveal() == "s3cr3t-value"
    assert "s3cr3t" not in repr(config)
    assert config.agent_type == "echo"  # the default agent
    assert config.reply.update_interval == 1.0
    assert config.conversation.session_key == "sender"


def test_json_instance_has_the_same_shape(tmp_path: Path) -> None:
    data = {
        "type": "app",
        "settings": {"client_id": "x", "client_secret": "y", "tags": ["a", "b"]},
        "agent": {"type": "echo", "delay": 0},
        "conversation": {"session_key": "conversation", "concurrency": 2},
    }
    write(tmp_path, "j.json", json.dumps(data))
    [config] = load_instances(tmp_path, REGISTRY, env={})
    assert config.settings.tags == ["a", "b"]
    assert config.agent_settings.delay == 0
    assert config.conversation.concurrency == 2


def test_only_toml_and_json_files_are_read(tmp_path: Path) -> None:
    write(tmp_path, "bot.toml", GOOD)
    write(tmp_path, "notes.txt", "not a config")
    write(tmp_path, "bot.toml.bak", "garbage = [")
    write(tmp_path, ".env", "APP_SECRET=from-dotenv\n")
    [config] = load_instances(tmp_path, REGISTRY)
    assert config.settings.client_secret.reveal() == "from-dotenv"


def test_real_environment_wins_over_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "bot.toml", GOOD)
    write(tmp_path, ".env", "APP_SECRET=from-dotenv\n")
    monkeypatch.setenv("APP_SECRET", "from-environment")
    [config] = load_instances(tmp_path, REGISTRY)
    assert config.settings.client_secret.reveal() == "from-environment"


def test_every_problem_is_reported_at_once_with_file_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "bad.toml",
        """
type = "app"
colour = "red"
[settings]
client_secret = "x"
port = -1
ratio = "fast"
verbose = "maybe"
mode = "html"
tags = "one"
unknown_setting = 1
[agent]
type = "echo"
delay = "slow"
[reply]
update_interval = -2
[conversation]
session_key = "room"
""",
    )
    found = problems(tmp_path)
    f = str(path)
    expected = [
        f"{f}: colour: unknown key",
        f"{f}: settings.unknown_setting: unknown key",
        f"{f}: settings.client_id: missing (expected a string)",
        f"{f}: settings.port: must be >= 0: -1",
        f"{f}: settings.ratio: expected a number, got 'fast'",
        f"{f}: settings.verbose: expected true or false, got 'maybe'",
        f"{f}: settings.mode: expected one of 'card', 'markdown', got 'html'",
        f"{f}: settings.tags: expected a list, got a string",
        f"{f}: agent.delay: expected a number, got 'slow'",
        f"{f}: reply.update_interval: must be >= 0",
        f"{f}: conversation.session_key: expected one of 'sender', 'conversation'",
    ]
    for want in expected:
        assert any(p.startswith(want) for p in found), (want, found)
    assert len(found) == len(expected)


def test_unknown_types_list_the_available_ones(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", 'type = "telegram"\n[agent]\ntype = "gpt"\n')
    found = problems(tmp_path)
    assert any("type: unknown driver type 'telegram' (available: app)" in p for p in found)
    assert any("agent.type: unknown agent type 'gpt' (available: echo)" in p for p in found)


def test_missing_type_and_syntax_errors(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", "enabled = true\n")
    write(tmp_path, "b.toml", "type = \n")
    write(tmp_path, "c.json", "{not json")
    write(tmp_path, "d.json", "[1, 2]")
    found = problems(tmp_path)
    assert any(
        p.endswith("a.toml: type: missing (expected the plugin's entry-point name)") for p in found
    )
    assert any("b.toml: not valid TOML" in p for p in found)
    assert any("c.json: not valid JSON" in p for p in found)
    assert any("d.json: expected a table at the top level" in p for p in found)


def test_missing_environment_variable_is_named(tmp_path: Path) -> None:
    write(tmp_path, "bot.toml", GOOD)
    assert problems(tmp_path) == [
        f"{tmp_path / 'bot.toml'}: settings.client_secret: "
        "environment variable APP_SECRET is not set"
    ]


def test_disabled_instance_needs_no_environment_but_is_schema_checked(tmp_path: Path) -> None:
    write(tmp_path, "off.toml", GOOD.replace('type = "app"', 'type = "app"\nenabled = false'))
    [config] = load_instances(tmp_path, REGISTRY, env={})
    assert not config.enabled and config.settings is None
    write(
        tmp_path,
        "off.toml",
        GOOD.replace("port = 8080", "port = 'x'").replace(
            'type = "app"', 'type = "app"\nenabled = false'
        ),
    )
    assert any("settings.port: expected an integer" in p for p in problems(tmp_path))


def test_substitution_cannot_change_the_structure(tmp_path: Path) -> None:
    # The reference design substitutes {{VAR}} in the raw text: this value would end the string and
    # add a key.  Here it stays one string, whatever it holds.
    nasty = '", "port": 1, "x": "\n]}{{${OTHER}'
    write(tmp_path, "bot.toml", GOOD)
    [config] = load_instances(tmp_path, REGISTRY, env={"APP_SECRET": nasty})
    assert config.settings.client_secret.reveal() == nasty
    assert config.settings.port == 8080


def test_defaults_escapes_and_typed_values_from_the_environment(tmp_path: Path) -> None:
    write(
        tmp_path,
        "bot.toml",
        """
type = "app"
[settings]
client_id = "${ID:-fallback-id}"
client_secret = "pa$$word"
port = "${PORT}"
verbose = "${VERBOSE}"
""",
    )
    [config] = load_instances(tmp_path, REGISTRY, env={"PORT": "9000", "VERBOSE": "false"})
    assert config.settings.client_id == "fallback-id"
    assert config.settings.client_secret.reveal() == "pa$word"
    assert config.settings.port == 9000
    assert config.settings.verbose is False


def test_malformed_reference(tmp_path: Path) -> None:
    write(tmp_path, "bot.toml", GOOD.replace("${APP_SECRET}", "${APP-SECRET}"))
    assert any("malformed reference '${APP-SECRET}'" in p for p in problems(tmp_path))


def test_duplicate_names_and_exclusive_apps(tmp_path: Path) -> None:
    write(tmp_path, "bot.toml", GOOD)
    write(
        tmp_path,
        "bot.json",
        json.dumps({"type": "app", "settings": {"client_id": "id-1", "client_secret": "s"}}),
    )
    write(tmp_path, "copy.toml", GOOD)
    found = problems(tmp_path, {"APP_SECRET": "s"})
    assert any("duplicate instance name 'bot'" in p for p in found)
    assert any("copy.toml: settings: connects the same app app as bot.json" in p for p in found)


def test_secret_values_never_appear_in_errors(tmp_path: Path) -> None:
    write(tmp_path, "bot.toml", GOOD.replace("port = 8080", 'port = "${APP_SECRET}"'))
    found = problems(tmp_path, {"APP_SECRET": "hunter2-secret"})
    assert found and not any("hunter2" in p for p in found)
    assert "got the value of ${APP_SECRET} (not shown)" in found[0]


def test_invalid_instance_names(tmp_path: Path) -> None:
    write(tmp_path, "-bad name.toml", GOOD)
    assert any(
        "instance name '-bad name' must be" in p for p in problems(tmp_path, {"APP_SECRET": "s"})
    )


def test_missing_folder(tmp_path: Path) -> None:
    assert problems(tmp_path / "nope") == [f"{tmp_path / 'nope'}: instances folder not found"]


def test_process_settings(tmp_path: Path) -> None:
    assert load_process_settings(tmp_path / "absent.toml").shutdown_grace == 10.0
    with pytest.raises(ConfigError, match="config file not found"):
        load_process_settings(tmp_path / "absent.toml", required=True)
    path = write(tmp_path, "gateway.toml", 'state_dir = "data"\n[log]\nformat = "json"\n')
    settings = load_process_settings(path)
    assert settings.state_path == (tmp_path / "data").resolve()
    assert settings.log.format == "json"
    write(tmp_path, "gateway.toml", 'shutdown_grace = "soon"\n[log]\nlevel = "loud"\nhttp = 1\n')
    with pytest.raises(ConfigError) as caught:
        load_process_settings(path)
    text = str(caught.value)
    assert "shutdown_grace: expected a number" in text
    assert "log.level: expected one of" in text
    assert "log.http: unknown key" in text


def test_an_unset_variable_in_a_typed_field_is_one_problem(tmp_path: Path) -> None:
    write(tmp_path, "bot.toml", GOOD.replace("port = 8080", 'port = "${PORT}"'))
    assert problems(tmp_path, {"APP_SECRET": "s"}) == [
        f"{tmp_path / 'bot.toml'}: settings.port: environment variable PORT is not set"
    ]
