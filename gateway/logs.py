"""Logging: every line names its instance, secrets are masked, text for people or JSON for collectors.

Structured fields ride on ``extra=`` (``instance``, ``conversation``, ``message_id``, ``event``).  The
redaction is done on the *formatted* line, after exceptions and arguments were rendered, so a secret
that a library puts into an error message is masked too.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any, Literal

from gateway.secrets import known_secret_values

__all__ = ["current_instance", "instance_logger", "redact", "setup_logging"]

#: The instance a task works for; tasks inherit it, so the core sets it once per instance task.
current_instance: contextvars.ContextVar[str] = contextvars.ContextVar("instance", default="-")

_FIELDS = ("conversation", "message_id", "event")


class _InstanceAdapter(logging.LoggerAdapter[logging.Logger]):
    """Adds the instance to a call's own ``extra`` (the stock adapter replaces it before 3.13,
    which silently dropped message ids and events from the JSON logs)."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def instance_logger(instance: str, name: str = "gateway") -> logging.LoggerAdapter[logging.Logger]:
    return _InstanceAdapter(logging.getLogger(name), {"instance": instance})


class _InstanceField(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "instance", None):
            record.instance = current_instance.get()
        return True


def _redact(line: str) -> str:
    for secret in known_secret_values():
        if secret in line:
            line = line.replace(secret, "***")
    return line


def redact(text: str) -> str:
    """``text`` with every known secret value masked, as in the log lines."""
    return _redact(text)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s [%(instance)s] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return _redact(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "instance": getattr(record, "instance", "-"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in _FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _redact(json.dumps(entry, ensure_ascii=False, default=str))


def setup_logging(level: str = "info", fmt: Literal["text", "json"] = "text") -> None:
    """Configure the root logger once for the process (the CLI calls this)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_InstanceField())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access log would print every request of the echo endpoint; keep it for debugging.
    logging.getLogger("aiohttp.access").setLevel(max(logging.WARNING, root.level))
