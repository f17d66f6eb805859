"""Turn a parsed TOML/JSON table into a settings object (an attrs class), reporting every problem.

Why not a generic structuring library: config errors are a user interface here.  Each problem must
name the key path and what was expected, all problems are reported at once, strings from ``${VAR}``
substitution must be parsed strictly ("false" is not truthy, "5x" is not an int), and the value of a
secret must never be echoed.  The supported field types are the few a settings class needs: str, int,
float, bool, Secret, Literal, Enum, ``X | None``, ``list[str]``/``tuple[str, ...]`` and nested attrs
classes (sub-tables).
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Mapping
from typing import Any

import attrs

from gateway.secrets import Secret

__all__ = [
    "MAX_DEPTH",
    "Problems",
    "Substituted",
    "Unresolved",
    "describe_type",
    "field_help",
    "structure",
    "too_deep",
]

Problems = list[tuple[str, str]]  # (key path, message)


@attrs.frozen
class Unresolved:
    """Stands for a ``${VAR}`` whose variable is not set, in a disabled instance: the key is known to
    be present, its value is not checked."""

    variable: str


class Substituted(str):
    """A string that came (partly) from environment variables.  Error messages never show it: the
    variable may hold a secret even where the key is not typed as one."""

    variables: tuple[str, ...]

    def __new__(cls, value: str, variables: tuple[str, ...]) -> Substituted:
        self = super().__new__(cls, value)
        self.variables = variables
        return self


_MISSING = object()
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


#: Deeper than any real file nests: substitution and validation recurse once per level and must
#: not run out of stack (``gateway check`` once crashed on a file nested a few hundred deep).
MAX_DEPTH = 32


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` nests tables or arrays more than ``limit`` levels deep (no recursion)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, Mapping):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return False


def field_help(field: attrs.Attribute[Any]) -> str:
    return str(field.metadata.get("help", ""))


def structure(cls: type[Any], data: Any, path: str, problems: Problems) -> Any | None:
    """Build ``cls`` from ``data``; append ``(key path, message)`` problems and return None on error.

    ``path`` prefixes every key in messages (e.g. ``settings``).
    """
    if not isinstance(data, Mapping):
        problems.append((path, f"expected a table, got {_kind(data)}"))
        return None
    attrs.resolve_types(cls)
    fields = {f.alias or f.name: f for f in attrs.fields(cls) if f.init}
    before = len(problems)
    for key in data:
        if key not in fields:
            expected = ", ".join(sorted(fields)) or "no keys"
            problems.append((_join(path, str(key)), f"unknown key (expected one of: {expected})"))
    kwargs: dict[str, Any] = {}
    unresolved = False
    for name, field in fields.items():
        key_path = _join(path, name)
        value = data.get(name, _MISSING)
        if value is _MISSING:
            if field.default is attrs.NOTHING:
                problems.append((key_path, f"missing (expected {describe_type(field.type)})"))
            continue
        if isinstance(value, Unresolved):
            unresolved = True
            continue
        converted = _convert(field.type, value, key_path, problems, secret=_is_secret(field.type))
        if converted is _MISSING:
            continue
        if field.validator is not None:
            try:
                field.validator(None, field, converted)
            except (ValueError, TypeError) as exc:
                problems.append((key_path, _validator_message(exc, field, converted)))
                continue
        kwargs[field.alias] = converted
    if len(problems) > before or unresolved:
        return None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        # Cross-field checks in __attrs_post_init__ land here.
        problems.append((path, str(exc)))
        return None


def _convert(tp: Any, value: Any, path: str, problems: Problems, *, secret: bool) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, path, problems, secret=secret)
        problems.append((path, "unsupported union type in settings class"))
        return _MISSING
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice and type(value) is not bool:
                return choice
        problems.append((path, f"expected one of {_choices(choices)}, got {_show(value, secret)}"))
        return _MISSING
    if origin in (list, tuple):
        item_type = typing.get_args(tp)[0]
        if not isinstance(value, list | tuple):
            problems.append((path, f"expected a list, got {_kind(value)}"))
            return _MISSING
        items = [
            _convert(item_type, v, f"{path}[{i}]", problems, secret=secret)
            for i, v in enumerate(value)
        ]
        if any(i is _MISSING for i in items):
            return _MISSING
        return tuple(items) if origin is tuple else items
    if isinstance(tp, type) and attrs.has(tp):
        result = structure(tp, value, path, problems)
        return _MISSING if result is None else result
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            choices = tuple(m.value for m in tp)
            problems.append(
                (path, f"expected one of {_choices(choices)}, got {_show(value, secret)}")
            )
            return _MISSING
    if tp is Secret:
        if isinstance(value, Secret):
            return value
        if isinstance(value, str):
            return Secret(str(value))
        problems.append((path, f"expected a string (secret), got {_kind(value)}"))
        return _MISSING
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        problems.append((path, f"expected true or false, got {_show(value, secret)}"))
        return _MISSING
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        problems.append((path, f"expected an integer, got {_show(value, secret)}"))
        return _MISSING
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        problems.append((path, f"expected a number, got {_show(value, secret)}"))
        return _MISSING
    if tp is str:
        if isinstance(value, str):
            return str(value)
        problems.append((path, f"expected a string, got {_kind(value)}"))
        return _MISSING
    problems.append((path, f"unsupported type {tp!r} in settings class"))
    return _MISSING


def describe_type(tp: Any) -> str:
    """A short, user-facing name for a settings field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [describe_type(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(inner)
    if origin is typing.Literal:
        return f"one of {_choices(typing.get_args(tp))}"
    if origin in (list, tuple):
        return f"a list, each {describe_type(typing.get_args(tp)[0])}"
    if isinstance(tp, type) and attrs.has(tp):
        return "a table"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"one of {_choices(tuple(m.value for m in tp))}"
    return {
        Secret: "a secret string",
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
    }.get(tp, str(tp))


def _is_secret(tp: Any) -> bool:
    return tp is Secret or Secret in typing.get_args(tp)


def _validator_message(exc: Exception, field: attrs.Attribute[Any], value: Any) -> str:
    if _is_secret(field.type):
        return "invalid secret value"
    # attrs' messages look like "'port' must be >= 0: -1"; drop the redundant field name.
    message = str(exc.args[0]) if exc.args else str(exc)
    prefix = f"'{field.name}' "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _choices(choices: tuple[Any, ...]) -> str:
    return ", ".join(repr(c) for c in choices)


def _show(value: Any, secret: bool) -> str:
    if secret:
        return "a secret value"
    if isinstance(value, Substituted):
        names = ", ".join(f"${{{v}}}" for v in value.variables)
        return f"the value of {names} (not shown)"
    return repr(value)


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
