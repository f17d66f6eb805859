"""Process-wide settings: ``gateway.toml`` (optional), never inside the instances folder."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import attrs

from gateway.config.envsubst import environment, substitute
from gateway.config.schema import MAX_DEPTH, Problems, structure, too_deep
from gateway.errors import ConfigError, ConfigProblem
from gateway.secrets import Secret

__all__ = [
    "TOKEN_VARIABLE",
    "HttpSettings",
    "LogSettings",
    "ProcessSettings",
    "load_process_settings",
]

#: The environment variable holding the outbound API's token when ``[http] token`` is not set.
TOKEN_VARIABLE = "GATEWAY_API_TOKEN"


@attrs.frozen
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = attrs.field(
        default="info", metadata={"help": "least severe level logged"}
    )
    format: Literal["text", "json"] = attrs.field(
        default="text", metadata={"help": "text for people, json for log collectors"}
    )


@attrs.frozen
class HttpSettings:
    enabled: bool = attrs.field(
        default=True,
        metadata={"help": "serve /healthz, /readyz, /v1/instances and /metrics over HTTP"},
    )
    host: str = attrs.field(
        default="127.0.0.1", metadata={"help": "address the operations endpoint listens on"}
    )
    port: int = attrs.field(
        default=8780,
        validator=[attrs.validators.ge(0), attrs.validators.le(65535)],
        metadata={"help": "TCP port of the operations endpoint (0: any free port, logged)"},
    )
    token: Secret | None = attrs.field(
        default=None,
        metadata={
            "help": "bearer token for POST /v1/instances/NAME/messages (default: the "
            f"{TOKEN_VARIABLE} environment variable); without one, sending is off"
        },
    )
    max_message_chars: int = attrs.field(
        default=20_000,
        validator=[attrs.validators.ge(1), attrs.validators.le(1_000_000)],
        metadata={
            "help": "longest text POST /v1/instances/NAME/messages takes (characters); a longer "
            "one is refused with 413 rather than sent as dozens of parts"
        },
    )


@attrs.frozen
class ProcessSettings:
    state_dir: str = attrs.field(
        default="./state",
        metadata={
            "help": "where the inbox, feedback and histories are kept (relative: to this file)"
        },
    )
    shutdown_grace: float = attrs.field(
        default=10.0,
        validator=attrs.validators.ge(0),
        metadata={"help": "seconds replies in flight may take to finish when stopping"},
    )
    inbox_ttl: float = attrs.field(
        default=86400.0,
        validator=attrs.validators.gt(0),
        metadata={"help": "seconds an answered message is remembered for deduplication"},
    )
    max_attempts: int = attrs.field(
        default=3,
        validator=attrs.validators.ge(1),
        metadata={
            "help": "attempts at answering one message (the first, then one per restart after a crash) before it is given up"
        },
    )
    log: LogSettings = attrs.field(factory=LogSettings)
    http: HttpSettings = attrs.field(factory=HttpSettings)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).resolve()


def load_process_settings(
    path: Path, *, required: bool = False, env: Mapping[str, str] | None = None
) -> ProcessSettings:
    """Read ``path``; a missing file gives the defaults unless ``required``."""
    file = str(path)
    env = environment(None) if env is None else env
    if not path.is_file():
        if required:
            raise ConfigError([ConfigProblem(file, "", "config file not found")])
        return _default_token(ProcessSettings(), env)
    found: Problems = []
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError([ConfigProblem(file, "", f"cannot read TOML: {exc}")]) from exc
    if too_deep(data):
        message = f"tables or arrays nested more than {MAX_DEPTH} levels deep"
        raise ConfigError([ConfigProblem(file, "", message)])
    data = substitute(data, env, "", found, allow_missing=False)
    settings = structure(ProcessSettings, data, "", found) if not found else None
    if settings is None:
        raise ConfigError([ConfigProblem(file, key, message) for key, message in found])
    # Relative paths in the file mean "next to the file", wherever the gateway is started from.
    settings = attrs.evolve(settings, state_dir=str(path.resolve().parent / settings.state_dir))
    return _default_token(settings, env)


def _default_token(settings: ProcessSettings, env: Mapping[str, str]) -> ProcessSettings:
    if settings.http.token is not None or not env.get(TOKEN_VARIABLE):
        return settings
    http = attrs.evolve(settings.http, token=Secret(env[TOKEN_VARIABLE]))
    return attrs.evolve(settings, http=http)
