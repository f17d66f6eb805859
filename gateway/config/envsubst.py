"""``${VAR}`` and ``${VAR:-default}`` in config values.

Substitution runs on *parsed* values, one string at a time, and its result is never parsed again: a
variable holding quotes, braces or newlines stays one string and cannot change the file's structure
(the reference design substitutes ``{{VAR}}`` in the raw JSON text, where a secret containing ``"``
breaks or rewrites the config).  ``$$`` stands for a literal ``$``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from gateway.config.schema import Problems, Substituted, Unresolved

__all__ = ["environment", "substitute"]

_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{[^}]*\}?")


def environment(env_file: Path | None) -> dict[str, str]:
    """The process environment over the ``.env`` file's values (the real environment wins)."""
    merged: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ)
    return merged


def substitute(
    value: Any, env: Mapping[str, str], path: str, problems: Problems, *, allow_missing: bool
) -> Any:
    """Return ``value`` with references replaced, recursing into tables and lists.

    A missing variable is a problem, or with ``allow_missing`` (disabled instances) the whole value
    becomes :class:`Unresolved` so the schema check skips it.
    """
    if isinstance(value, Mapping):
        return {
            k: substitute(v, env, _join(path, str(k)), problems, allow_missing=allow_missing)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            substitute(v, env, f"{path}[{i}]", problems, allow_missing=allow_missing)
            for i, v in enumerate(value)
        ]
    if not isinstance(value, str) or "$" not in value:
        return value

    missing: list[str] = []

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name is None:
            problems.append(
                (path, f"malformed reference {text!r} (use ${{NAME}} or ${{NAME:-default}})")
            )
            return text
        found = env.get(name)
        if found:
            return found
        if default is not None:
            return default
        if found is not None:
            return found  # set but empty, and no default: the empty string is what was asked for
        missing.append(name)
        return text

    used: list[str] = []

    def record(match: re.Match[str]) -> str:
        if match.group(1):
            used.append(match.group(1))
        return replace(match)

    result = _REFERENCE.sub(record, value)
    if missing:
        if not allow_missing:
            for name in missing:
                problems.append((path, f"environment variable {name} is not set"))
        # Either way the value is unknown: the schema check must not report it a second time.
        return Unresolved(missing[0])
    return Substituted(result, tuple(used)) if used else result


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
