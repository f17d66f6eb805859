"""Config fuzzing: random instance files (TOML and JSON) and ``gateway.toml`` documents never crash
``gateway check``; it accepts them or rejects them with exit code 2, and every problem it prints
names its file, and the key when the file could be read as a table.

The bulk calls the CLI's entry point in this process (a subprocess costs a second each); a handful
run ``gateway check`` as a real subprocess, as a user would.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from gateway.cli import main
from gateway.config import (
    AccessSettings,
    ConversationSettings,
    LogSettings,
    ProcessSettings,
    ReconnectSettings,
    ReplySettings,
)
from gateway.config.process import HttpSettings
from gateway.config.schema import too_deep
from gateway.plugins import AGENTS, DRIVERS, PluginRegistry
from gateway_testkit.process import run_cli

REGISTRY = PluginRegistry.discover()
UNSET = "GW_FUZZ_NEVER_SET"


def names(*classes: Any) -> list[str]:
    return sorted({field.name for cls in classes for field in attrs.fields(cls)})


def settings_keys(group: str) -> dict[str, list[str]]:
    """Every installed plugin of ``group`` that loads -> the keys of its settings table, so a
    driver or agent installed later is fuzzed without touching this file."""
    return {p.name: names(p.cls.settings_class) for p in REGISTRY.all(group) if p.cls is not None}


DRIVER_KEYS = settings_keys(DRIVERS)
AGENT_KEYS = settings_keys(AGENTS)
#: every driver type name, those that fail to load included (``check`` must name them too)
DRIVER_TYPES = sorted(p.name for p in REGISTRY.all(DRIVERS))

# Real key names, so documents get past "unknown key" and reach the validation of values.
TABLE_KEYS = {
    "settings": sorted({key for keys in DRIVER_KEYS.values() for key in keys}),
    "agent": sorted({"type", *(key for keys in AGENT_KEYS.values() for key in keys)}),
    "reply": names(ReplySettings),
    "conversation": names(ConversationSettings),
    "reconnect": names(ReconnectSettings),
    "access": names(AccessSettings),
}
PROCESS_KEYS = {"": names(ProcessSettings), "log": names(LogSettings), "http": names(HttpSettings)}

# Keys without dots, colons or spaces, so a printed "file: key: message" reads unambiguously.
ODD_KEY = st.text(
    st.characters(categories=["L", "N"]) | st.sampled_from("_-"), min_size=1, max_size=12
)
TEXT = st.text(st.characters(exclude_categories=()), max_size=30) | st.sampled_from(
    [
        *DRIVER_TYPES,
        *AGENT_KEYS,
        f"${{{UNSET}}}",
        f"${{{UNSET}:-0.5}}",
        "${HOME}",
        "$$",
        "${",
        "debug",
        "json",
        "127.0.0.1",
    ]
)
SCALAR = (
    st.integers(0, 100)  # plausible values first, so that some documents pass
    | st.floats(0, 10)
    | st.none()
    | st.booleans()
    | st.integers(-(2**65), 2**65)
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
)
VALUE = SCALAR | st.lists(SCALAR, max_size=3) | st.dictionaries(ODD_KEY, SCALAR, max_size=3)


def table(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys) | ODD_KEY, VALUE, max_size=6)


INSTANCE = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from([*DRIVER_TYPES, "no-such-driver"]) | VALUE,
        "enabled": st.booleans() | VALUE,
        "description": VALUE,
        **{name: table(keys) | VALUE for name, keys in TABLE_KEYS.items()},
        "colour": VALUE,
    },
)
PROCESS = st.fixed_dictionaries(
    {},
    optional={
        **{key: VALUE for key in PROCESS_KEYS[""] if key not in ("log", "http")},
        "log": table(PROCESS_KEYS["log"]) | VALUE,
        "http": table(PROCESS_KEYS["http"]) | VALUE,
        "colour": VALUE,
    },
)
#: an instance of one installed driver, its settings drawn from that driver's own keys (and an
#: agent from one agent's): past "unknown key", into each driver's own validation
TYPED = st.sampled_from(sorted(DRIVER_KEYS)).flatmap(
    lambda driver: st.fixed_dictionaries(
        {"type": st.just(driver), "settings": table(DRIVER_KEYS[driver])},
        optional={
            "agent": st.sampled_from(sorted(AGENT_KEYS)).flatmap(
                lambda agent: table(AGENT_KEYS[agent]).map(lambda t: {"type": agent, **t})
            ),
            "reply": table(TABLE_KEYS["reply"]),
        },
    )
)
#: a valid echo instance with a few tables of other keys and values over it
NEAR_VALID = st.dictionaries(
    st.sampled_from(["reply", "conversation", "reconnect", "access", "agent"]),
    st.just({}) | table(TABLE_KEYS["reply"] + TABLE_KEYS["conversation"]),
    max_size=2,
).map(lambda tables: {"type": "echo", "settings": {"terminal": "off"}, **tables})
#: what goes in a file: a document, or something that is not one at all
CONTENT = (
    NEAR_VALID
    | TYPED
    | INSTANCE
    | st.text(max_size=80)
    | st.binary(max_size=40)
    # Arrays nested deeper than the parsers recurse.
    | st.integers(10, 3_000).map(lambda depth: '{"type": ' + "[" * depth + "]" * depth + "}")
    | st.integers(10, 3_000).map(lambda depth: "type = " + "[" * depth + "]" * depth)
)


# -- writing TOML (the standard library only reads it) ----------------------------------------------


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)  # repr gives inf, -inf, 1e+16...
    if isinstance(value, int):
        return str(value)  # beyond 64 bits: not valid TOML, which check must report
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value if v is not None) + "]"
    pairs = (f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items() if v is not None)
    return "{" + ", ".join(pairs) + "}"


def toml_lines(document: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[str]:
    """``document`` as TOML: its plain keys first, then a ``[section]`` per table.  TOML has no
    null: None values are left out."""
    tables = {k: v for k, v in document.items() if isinstance(v, dict)}
    for key, value in document.items():
        if value is not None and key not in tables:
            yield f"{toml_key(key)} = {toml_value(value)}"
    for key, value in tables.items():
        yield "[" + ".".join(toml_key(part) for part in (*path, key)) + "]"
        yield from toml_lines(value, (*path, key))


def encode(content: Any, suffix: str) -> bytes:
    if isinstance(content, bytes):
        return content
    if isinstance(content, str):
        text = content
    elif suffix == ".toml":
        text = "\n".join(toml_lines(content)) + "\n"
    else:
        text = json.dumps(content, ensure_ascii=False)
    # Lone surrogates stay in as invalid UTF-8: an unreadable file must be reported, too.
    return text.encode("utf-8", "surrogatepass")


def as_table(raw: bytes, suffix: str) -> dict[str, Any] | None:
    """The file as the gateway reads it, if it is a table at all and not nested beyond the limit
    (problems with such files are about the whole file: they name no key)."""
    try:
        data = tomllib.loads(raw.decode()) if suffix == ".toml" else json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError and TOMLDecodeError are ValueErrors
        return None
    return data if isinstance(data, dict) and not too_deep(data) else None


# -- judging -------------------------------------------------------------------------------------------


@attrs.frozen
class Folder:
    instances: Path
    config: Path | None
    #: every file written -> the table it holds (None: not readable as a table)
    tables: dict[Path, dict[str, Any] | None]

    def args(self) -> list[str]:
        config = ["--config", str(self.config)] if self.config else []
        return ["check", "--instances", str(self.instances), *config]


_serial = itertools.count()


def write_folder(root: Path, files: list[tuple[str, Any]], process: Any | None) -> Folder:
    base = root / f"case-{next(_serial)}"
    instances = base / "instances"
    instances.mkdir(parents=True)
    tables: dict[Path, dict[str, Any] | None] = {}
    for i, (suffix, content) in enumerate(files):
        path = instances / f"bot{i}{suffix}"
        path.write_bytes(encode(content, suffix))
        tables[path] = as_table(path.read_bytes(), suffix)
    config = None
    if process is not None:
        config = base / "gateway.toml"
        config.write_bytes(encode(process, ".toml"))
        tables[config] = as_table(config.read_bytes(), ".toml")
    return Folder(instances, config, tables)


#: where a key path may start besides a file's own keys: tables and keys the schema requires
SCHEMA_KEYS = {"type", *TABLE_KEYS, *PROCESS_KEYS[""]}


def judge(folder: Folder, code: int, stdout: str, stderr: str) -> None:
    """Accepted (0), or rejected (2) with every problem naming its file and, in a readable
    table, a key path starting at one of its keys or at a key the schema requires there
    (``type``; ``settings.client_id`` of a DingTalk instance without settings)."""
    assert code in (0, 2), f"exit code {code}:\n{stderr}"
    assert "Traceback" not in stderr and "gateway failed" not in stderr, stderr
    if code == 0:
        assert stdout.splitlines()[-1].startswith("configuration OK"), stdout
        return
    header, *problems = [line for line in stderr.splitlines() if line.strip()]
    assert header == f"gateway: invalid configuration ({len(problems)} problem(s)):", stderr
    for line in problems:
        problem = line.strip()
        file = next((f for f in folder.tables if problem.startswith(f"{f}: ")), None)
        assert file is not None, f"no file named in {problem!r}"
        table = folder.tables[file]
        if table is not None:
            key = problem[len(f"{file}: ") :].split(": ", 1)[0]
            first = re.split(r"[.\[]", key)[0]
            assert first in {*table, *SCHEMA_KEYS}, f"no key of {file} named in {problem!r}"


FILES = st.lists(st.tuples(st.sampled_from([".toml", ".json"]), CONTENT), min_size=1, max_size=3)


@contextlib.contextmanager
def root_logging_kept() -> Iterator[None]:
    """``main`` configures the root logger for the process; give pytest back its own."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(files=FILES, process=st.none() | PROCESS | st.text(max_size=40))
# Each once crashed ``gateway check`` with a RecursionError (the parser; then the substitution).
@example(files=[(".toml", "type = " + "[" * 992 + "]" * 992)], process=None)
@example(files=[(".json", '{"type": ' + "[" * 600 + "]" * 600 + "}")], process="a = [[[[]]]]")
def test_check_never_crashes_and_names_file_and_key(
    files: list[tuple[str, Any]],
    process: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(UNSET, raising=False)
    folder = write_folder(tmp_path, files, process)
    capsys.readouterr()
    with root_logging_kept():
        code = main(folder.args())
    out, err = capsys.readouterr()
    event(f"exit code {code}")  # how many were accepted: --hypothesis-show-statistics
    judge(folder, code, out, err)


@settings(
    max_examples=4,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(files=FILES, process=st.none() | PROCESS)
def test_check_as_a_subprocess_never_crashes_and_names_file_and_key(
    files: list[tuple[str, Any]], process: Any, tmp_path: Path
) -> None:
    folder = write_folder(tmp_path, files, process)
    result = run_cli(*folder.args(), cwd=tmp_path)
    judge(folder, result.returncode, result.stdout, result.stderr)


def test_every_installed_driver_is_fuzzed() -> None:
    """The keys come from the registry: a driver that fails to load would silently drop out."""
    assert {"echo", "dingtalk-stream", "feishu"} <= DRIVER_KEYS.keys(), sorted(DRIVER_KEYS)
    assert {"client_id", "app_id"} <= set(TABLE_KEYS["settings"])
