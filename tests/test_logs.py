"""``gateway --log-format json run`` end to end: the real CLI in a subprocess, an echo instance.

What a log collector relies on: every line on stderr is one JSON object with ``time``, ``level``,
``instance``, ``logger`` and ``message``; a line about a message carries its ``message_id``; and no
value taken from the environment (a secret in a setting, in the agent's settings) ever appears in the
output, at the default level or at ``debug``.  Every process is killed at teardown and every wait has
a deadline.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from gateway_testkit.process import (
    EchoClient,
    GatewayProcess,
    GatewayProcesses,
    free_port,
    loopback_env,
)

SECRET = "s3cr3t-sender-7f2a9c41d0"
AGENT_SECRET = "agent-prefix-secret-5be8e21a"
MESSAGES = {"log-m1": "hello json logs", "log-m2": "second message here", "log-m3": "and a third"}
FIELDS = ("time", "level", "instance", "logger", "message")
LEVELS = {"debug", "info", "warning", "error", "critical"}


def setup_folder(root: Path, port: int) -> None:
    """``root/instances/bot.toml`` (echo, terminal off, secrets from the environment) and
    ``root/gateway.toml`` (state inside ``root``)."""
    folder = root / "instances"
    folder.mkdir()
    (folder / "bot.toml").write_text(
        f"""\
type = "echo"

[settings]
host = "127.0.0.1"
port = {port}
terminal = "off"
terminal_sender = "${{MY_SECRET}}"

[agent]
type = "echo"
delay = 0.01
prefix = "${{AGENT_PREFIX:-}}"

[reply]
update_interval = 0.02
"""
    )
    (root / "gateway.toml").write_text('state_dir = "state"\n')


async def run_and_stop(
    tmp_path: Path, gateways: GatewayProcesses, *global_args: str, prefix: bool = False
) -> GatewayProcess:
    """Run the gateway with JSON logs, send ``MESSAGES`` over HTTP, stop it with SIGTERM."""
    port = free_port()
    setup_folder(tmp_path, port)
    extra = {"MY_SECRET": SECRET, "AGENT_PREFIX": AGENT_SECRET if prefix else None}
    gateway = gateways.start(
        "--log-format",
        "json",
        *global_args,
        "run",
        "--instances",
        tmp_path / "instances",
        "--config",
        tmp_path / "gateway.toml",
        cwd=tmp_path,
        env=loopback_env(extra),
    )
    await gateway.wait_http(f"http://127.0.0.1:{port}")
    async with EchoClient(port) as client:
        for message_id, text in MESSAGES.items():
            events = await client.ask(text, message_id)
            assert events[-1][0] == "final", (events, gateway.describe())
        # A redelivery logs a line about the message too (the duplicate).
        events = await client.ask("hello json logs", "log-m1")
        assert [name for name, _ in events] == ["duplicate"], events
    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()
    return gateway


def parse_lines(gateway: GatewayProcess) -> list[dict[str, Any]]:
    """Every stderr line as a JSON object with the required fields (asserted)."""
    entries = []
    lines = gateway.stderr.splitlines()
    assert lines, gateway.describe()
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}\n{gateway.describe()}")
        assert isinstance(entry, dict), line
        missing = [field for field in FIELDS if field not in entry]
        assert not missing, f"{missing} missing from {line!r}"
        assert all(isinstance(entry[field], str) for field in FIELDS), line
        assert entry["level"] in LEVELS, line
        assert entry["time"].endswith("Z") and "T" in entry["time"], line
        entries.append(entry)
    return entries


def assert_message_lines_carry_the_id(entries: list[dict[str, Any]]) -> None:
    """A line that names one of our message ids is about that message: it says so in a field."""
    about = [
        (message_id, entry)
        for entry in entries
        for message_id in MESSAGES
        if message_id in entry["message"]
    ]
    for message_id, entry in about:
        assert entry.get("message_id") == message_id, entry
    for entry in entries:
        if "message_id" in entry:
            assert entry["instance"] == "bot", entry
            assert entry["message_id"] in MESSAGES, entry
    # The duplicate delivery of log-m1 is reported with its id and event.
    duplicates = [e for e in entries if e.get("event") == "duplicate"]
    assert [e["message_id"] for e in duplicates] == ["log-m1"], entries


def assert_no_secret(gateway: GatewayProcess, *secrets: str) -> None:
    output = gateway.stdout + gateway.stderr
    for secret in secrets:
        assert secret not in output, output


@pytest.mark.parametrize("level", ["info", "debug"])
async def test_json_run_writes_one_object_per_line_without_secrets(
    tmp_path: Path, gateways: GatewayProcesses, level: str
) -> None:
    gateway = await run_and_stop(tmp_path, gateways, "--log-level", level)
    entries = parse_lines(gateway)
    levels = {e["level"] for e in entries}
    if level == "debug":
        assert "debug" in levels, entries  # the debug level was on
    else:
        assert "debug" not in levels, entries
    assert any(e["instance"] == "bot" for e in entries), entries
    assert any("SIGTERM received" in e["message"] for e in entries), entries
    assert entries[-1]["message"] == "gateway stopped", entries[-1]
    for message_id in MESSAGES:  # each message is logged, by id, under its instance
        assert any(message_id in e["message"] and e["instance"] == "bot" for e in entries), entries
    assert_no_secret(gateway, SECRET)


@pytest.mark.parametrize("level", ["info", "debug"])
async def test_agent_setting_from_a_secret_variable_is_never_logged(
    tmp_path: Path, gateways: GatewayProcesses, level: str
) -> None:
    """The agent's prefix comes from another variable; the answers contain it (that is the
    point of a prefix), the logs must not."""
    gateway = await run_and_stop(tmp_path, gateways, "--log-level", level, prefix=True)
    parse_lines(gateway)
    assert_no_secret(gateway, SECRET, AGENT_SECRET)


@pytest.mark.parametrize("level", ["info", "debug"])
async def test_lines_about_a_message_carry_its_id(
    tmp_path: Path, gateways: GatewayProcesses, level: str
) -> None:
    gateway = await run_and_stop(tmp_path, gateways, "--log-level", level)
    assert_message_lines_carry_the_id(parse_lines(gateway))
