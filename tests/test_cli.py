"""The ``gateway`` command end to end: the real CLI in a subprocess, the echo driver's HTTP endpoint.

Each test has its own folder (``tmp_path``) with an instances folder, a ``gateway.toml`` whose state
directory is inside it, and echo endpoints on free ports of 127.0.0.1.  Every process is killed at
teardown (the ``gateways`` fixture) and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway_testkit.process import (
    EchoClient,
    GatewayProcess,
    GatewayProcesses,
    free_port,
    loopback_env,
    run_cli,
)

SECRET = "hunter2-very-secret"
OTHER_SECRET = "correct-horse-battery-staple"
TEN_WORDS = "one two three four five six seven eight nine ten"
EIGHT_WORDS = "alpha bravo charlie delta echo foxtrot golf hotel"


def echo_instance(
    port: int | str,
    *,
    delay: float = 0.05,
    update_interval: float = 0.05,
    settings: str = "",
    extra: str = "",
) -> str:
    """An echo instance file: echo driver on 127.0.0.1:``port`` (no terminal), echo agent."""
    return f"""\
type = "echo"

[settings]
host = "127.0.0.1"
port = {json.dumps(port)}
terminal = "off"
{settings}

[agent]
type = "echo"
delay = {delay}

[reply]
update_interval = {update_interval}

{extra}
"""


def setup_folder(
    root: Path, instances: dict[str, str], *, gateway_toml: str = ""
) -> tuple[Path, Path]:
    """Write ``root/instances/<name>.toml`` files and ``root/gateway.toml`` (state in ``root``)."""
    folder = root / "instances"
    folder.mkdir(exist_ok=True)
    for name, text in instances.items():
        (folder / (name if "." in name else f"{name}.toml")).write_text(text)
    config = root / "gateway.toml"
    config.write_text(f'state_dir = "state"\n{gateway_toml}\n')
    return folder, config


def start_gateway(
    gateways: GatewayProcesses,
    root: Path,
    *,
    env: dict[str, str] | None = None,
    global_args: tuple[str, ...] = (),
) -> GatewayProcess:
    return gateways.start(
        *global_args,
        "run",
        "--instances",
        root / "instances",
        "--config",
        root / "gateway.toml",
        cwd=root,
        env=env,
    )


def log_lines(text: str, *fragments: str) -> list[str]:
    return [line for line in text.splitlines() if all(f in line for f in fragments)]


def assert_answer(events: list[tuple[str, dict[str, object]]], text: str) -> None:
    names = [name for name, _ in events]
    assert names[0] == "thinking", names
    assert "update" in names, names
    assert names[-2:] == ["part", "final"], names
    assert events[-1][1] == {"event": "final", "text": text, "parts": 1}
    # Updates grow towards the answer: each is a prefix of the final text.
    updates = [str(data["text"]) for name, data in events if name == "update"]
    assert all(text.startswith(u) for u in updates), updates


# -- 1. run, answer, stop --------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_run_answers_over_http_and_exits_0_on_signal(
    tmp_path: Path, gateways: GatewayProcesses, signum: signal.Signals
) -> None:
    port = free_port()
    setup_folder(tmp_path, {"bot": echo_instance(port, delay=0.05)})
    gateway = start_gateway(gateways, tmp_path)
    await gateway.wait_http(f"http://127.0.0.1:{port}")

    async with EchoClient(port) as client:
        events = await client.ask("hello brave new world", "m1")
        assert_answer(events, "hello brave new world")
        status, body = await client.get("m1")
        assert status == 200 and body["state"] == "final"

    sent = time.monotonic()
    gateway.send(signum)
    assert await gateway.wait_exit(5) == 0, gateway.describe()
    assert time.monotonic() - sent < 5

    stderr = gateway.stderr
    assert log_lines(stderr, "[bot]", "starting (echo driver, echo agent)"), stderr
    assert log_lines(stderr, "[bot]", f"echo listening on http://127.0.0.1:{port}"), stderr
    assert log_lines(stderr, "[bot]", "answered message m1 (answered)"), stderr
    assert log_lines(stderr, "[bot]", "stopped"), stderr
    assert f"{signum.name} received" in stderr
    assert "gateway stopped" in stderr
    assert "Traceback" not in stderr


def test_console_script_and_module_entry_point(tmp_path: Path) -> None:
    """``python -m gateway.cli`` (used by every other test) and the installed ``gateway`` script are
    the same command: without a subcommand both print the usage and exit 2."""
    from_module = run_cli(cwd=tmp_path)
    assert from_module.returncode == 2
    assert "usage: gateway" in from_module.stdout

    script = Path(sys.executable).parent / "gateway"
    assert script.exists(), f"console script not installed next to {sys.executable}"
    result = subprocess.run(
        [str(script), "plugins"],
        cwd=tmp_path,
        env=loopback_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Drivers (gateway.drivers):" in result.stdout


# -- 2. graceful shutdown ----------------------------------------------------------------------------


async def test_sigterm_lets_the_answer_in_flight_finish(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    port = free_port()
    setup_folder(
        tmp_path, {"bot": echo_instance(port, delay=0.3)}, gateway_toml="shutdown_grace = 10"
    )
    gateway = start_gateway(gateways, tmp_path)
    await gateway.wait_http(f"http://127.0.0.1:{port}")

    async with EchoClient(port) as client, client.post(TEN_WORDS, "slow") as stream:
        await stream.until("update")
        gateway.send(signal.SIGTERM)
        await gateway.wait_log("SIGTERM received")
        await asyncio.sleep(0.1)  # the signal was handled; let the instance stop taking messages
        # While draining, new messages are refused (not stored, so the platform sends them again).
        async with client.session.post(
            f"{client.base}/messages", json={"text": "late", "id": "late"}
        ) as late:
            assert late.status == 503, await late.text()
            assert "shutting down" in (await late.json())["error"]
        events = await stream.rest()

    assert_answer(events, TEN_WORDS)
    assert stream.broken is None
    assert await gateway.wait_exit(10) == 0, gateway.describe()
    assert log_lines(gateway.stderr, "[bot]", "answered message slow (answered)")


async def test_answer_still_running_after_the_grace_period_is_interrupted(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    port = free_port()
    setup_folder(
        tmp_path, {"bot": echo_instance(port, delay=0.5)}, gateway_toml="shutdown_grace = 0.2"
    )
    gateway = start_gateway(gateways, tmp_path)
    await gateway.wait_http(f"http://127.0.0.1:{port}")

    async with EchoClient(port) as client, client.post(TEN_WORDS, "slow") as stream:
        await stream.until("update")
        sent = time.monotonic()
        gateway.send(signal.SIGTERM)
        events = await stream.rest(timeout=5)

    name, data = events[-1]
    assert name == "error", events
    assert "interrupted" in str(data["error"])
    # The error carries what was answered so far.
    assert data["text"] and TEN_WORDS.startswith(str(data["text"])), data
    assert "final" not in [n for n, _ in events]
    assert await gateway.wait_exit(5) == 0, gateway.describe()
    assert time.monotonic() - sent < 5
    assert log_lines(gateway.stderr, "[bot]", "interrupting the answers still running")


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_second_signal_during_the_grace_period_exits_at_once(
    tmp_path: Path, gateways: GatewayProcesses, second: signal.Signals
) -> None:
    """The second signal ends the process immediately with exit code 1 (``os._exit``: a runtime
    failure, since answers were abandoned — they are resumed from the inbox on the next start)."""
    port = free_port()
    # A 10 s answer: on a loaded machine it must not end before the second signal lands.
    setup_folder(
        tmp_path, {"bot": echo_instance(port, delay=1.0)}, gateway_toml="shutdown_grace = 30"
    )
    gateway = start_gateway(gateways, tmp_path)
    await gateway.wait_http(f"http://127.0.0.1:{port}")

    async with EchoClient(port) as client, client.post(TEN_WORDS, "slow") as stream:
        await stream.until("update")
        gateway.send(signal.SIGTERM)
        await gateway.wait_log("SIGTERM received")
        sent = time.monotonic()
        gateway.send(second)
        assert await gateway.wait_exit(3) == 1, gateway.describe()
        assert time.monotonic() - sent < 3
        events = await stream.rest(timeout=5)

    names = [n for n, _ in events]
    assert "final" not in names and "error" not in names, names  # cut off, not answered
    assert "second signal: exiting now" in gateway.stderr


async def test_sighup_while_stopping_is_ignored_and_the_stop_stays_graceful(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    """SIGHUP's default action ends the process: a reload request (``systemctl reload``, a log
    rotation script) during a graceful stop must not cut the answer in flight."""
    port = free_port()
    setup_folder(
        tmp_path, {"bot": echo_instance(port, delay=0.3)}, gateway_toml="shutdown_grace = 10"
    )
    pidfile = tmp_path / "state" / "gateway.pid"
    gateway = start_gateway(gateways, tmp_path)
    await gateway.wait_http(f"http://127.0.0.1:{port}")
    assert pidfile.exists()

    async with EchoClient(port) as client, client.post(TEN_WORDS, "slow") as stream:
        await stream.until("update")
        gateway.send(signal.SIGTERM)
        await gateway.wait_log("SIGTERM received")
        gateway.send(signal.SIGHUP)
        await gateway.wait_log("SIGHUP received while stopping: reload ignored")
        events = await stream.rest()

    assert_answer(events, TEN_WORDS)
    assert stream.broken is None
    assert await gateway.wait_exit(10) == 0, gateway.describe()
    stderr = gateway.stderr
    assert log_lines(stderr, "[bot]", "answered message slow (answered)"), stderr
    assert "gateway stopped" in stderr and "reloading" not in stderr
    assert not pidfile.exists()


async def test_sighup_during_start_up_is_carried_out_once_running(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    """SIGHUPs from the first log line on (the configs are read, the database and the endpoint
    open, the instances start) neither kill the gateway nor get lost: one reload follows."""
    port = free_port()
    setup_folder(tmp_path, {"bot": echo_instance(port)})
    gateway = start_gateway(gateways, tmp_path)
    deadline = time.monotonic() + 20
    while not gateway.stderr:
        assert gateway.returncode is None and time.monotonic() < deadline, gateway.describe()
        await asyncio.sleep(0.002)
    sent = 0
    while "gateway running" not in gateway.stderr:
        assert gateway.returncode is None, f"after {sent} SIGHUP(s): {gateway.describe()}"
        assert time.monotonic() < deadline, gateway.describe()
        gateway.send(signal.SIGHUP)
        sent += 1
        await asyncio.sleep(0.003)
    assert sent, "the gateway was up before the first SIGHUP: nothing was tested"

    stderr = await gateway.wait_log("reload: 1 unchanged")
    assert "SIGHUP received during start-up: reloading now that the gateway is running" in stderr
    async with EchoClient(port) as client:
        assert_answer(await client.ask("still here", "m1"), "still here")
    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(10) == 0, gateway.describe()


# -- 3. dedup and resume after kill -9 -----------------------------------------------------------------


async def test_message_is_resumed_after_kill_9_and_never_answered_twice(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    port = free_port()
    setup_folder(tmp_path, {"bot": echo_instance(port, delay=0.5)})
    first = start_gateway(gateways, tmp_path)
    await first.wait_http(f"http://127.0.0.1:{port}")

    async with EchoClient(port) as client:
        async with client.post(EIGHT_WORDS, "k1") as stream:
            update = await stream.until("update")
            assert EIGHT_WORDS.startswith(str(update["text"]))
            first.kill()
            assert await first.wait_exit(5) == -signal.SIGKILL
            await stream.rest(timeout=5)
        assert "final" not in stream.names

        second = start_gateway(gateways, tmp_path)
        await second.wait_http(f"http://127.0.0.1:{port}")
        # Echo's transcripts live in memory: what GET shows now is the resumed reply.
        resumed = await client.wait_state("k1", "final", timeout=20)
        assert resumed["text"] == EIGHT_WORDS
        assert resumed["events"][0]["event"] == "thinking"
        assert log_lines(second.stderr, "[bot]", "resuming 1 unanswered message(s)"), second.stderr

        again = await client.ask("sent again by the platform", "k1")
        assert again == [("duplicate", {"event": "duplicate", "id": "k1"})]
        status, body = await client.get("k1")
        assert status == 200 and body["text"] == EIGHT_WORDS  # still the one answer

        assert_answer(await client.ask("new message", "k2"), "new message")

    second.send(signal.SIGTERM)
    assert await second.wait_exit(5) == 0, second.describe()
    stderr = second.stderr
    assert len(log_lines(stderr, "answered message k1 ")) == 1, stderr
    assert log_lines(stderr, "[bot]", "duplicate message k1 ignored"), stderr


# -- 4. check --------------------------------------------------------------------------------------


def test_check_reports_every_problem_with_file_and_key(tmp_path: Path) -> None:
    folder, config = setup_folder(
        tmp_path,
        {
            "unknown_key": 'type = "echo"\ncolour = "red"\n',
            "wrong_type": echo_instance("eighty"),
            "missing_env": echo_instance("${GW_TEST_UNSET_PORT}"),
            "unknown_driver": 'type = "no-such-driver"\n',
            "bad_toml": 'type = "echo\n',
            "bad_json.json": json.dumps({"type": "echo", "enabled": "maybe"}),
        },
        gateway_toml="shutdown_grase = 3",
    )

    result = run_cli(
        "check",
        "--instances",
        folder,
        "--config",
        config,
        cwd=tmp_path,
        env=loopback_env(drop=["GW_TEST_UNSET_PORT"]),
    )
    assert result.returncode == 2, result
    err = result.stderr
    assert "invalid configuration" in err

    def problem(file: Path, key: str, *words: str) -> None:
        where = f"{file}: {key}: " if key else f"{file}: "
        assert log_lines(err, where, *words), f"no problem {where}{words} in:\n{err}"

    problem(config, "shutdown_grase", "unknown key")
    problem(folder / "unknown_key.toml", "colour", "unknown key")
    problem(folder / "wrong_type.toml", "settings.port", "expected an integer", "'eighty'")
    problem(folder / "missing_env.toml", "settings.port", "GW_TEST_UNSET_PORT is not set")
    problem(folder / "unknown_driver.toml", "type", "unknown driver type 'no-such-driver'", "echo")
    problem(folder / "bad_toml.toml", "", "not valid TOML")
    problem(folder / "bad_json.json", "enabled", "expected true or false")
    assert result.stdout == ""  # no summary for an invalid folder
    assert not (tmp_path / "state").exists()  # nothing connected, nothing created


def test_check_accepts_a_valid_folder_and_prints_the_summary(tmp_path: Path) -> None:
    folder, config = setup_folder(
        tmp_path,
        {
            "alpha": echo_instance(free_port()),
            "beta": echo_instance(0, extra='[conversation]\nsession_key = "conversation"'),
            # Disabled instances may use variables that are not set.
            "gamma": echo_instance("${GW_TEST_UNSET_PORT}").replace(
                'type = "echo"', 'type = "echo"\nenabled = false', 1
            ),
        },
        gateway_toml="shutdown_grace = 3",
    )
    (folder / "README.txt").write_text("not an instance file")
    result = run_cli(
        "check",
        "--instances",
        folder,
        "--config",
        config,
        cwd=tmp_path,
        env=loopback_env(drop=["GW_TEST_UNSET_PORT"]),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "alpha: echo driver, echo agent (enabled)",
        "beta: echo driver, echo agent (enabled)",
        "gamma: echo driver, echo agent (disabled)",
        f"configuration OK: 3 instance(s) in {folder}",
    ]
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("command", ["check", "run"])
def test_config_errors_never_show_a_value_from_the_environment(
    tmp_path: Path, command: str
) -> None:
    """A variable may hold a secret even where the key is no secret field: errors name the variable,
    never its value (checked for ``check`` and for ``run``, which must not start)."""
    folder, config = setup_folder(
        tmp_path,
        {
            "bot": echo_instance(
                "${MY_SECRET}", extra='[conversation]\nconcurrency = "${OTHER_SECRET}"'
            ),
        },
        gateway_toml='shutdown_grace = "${MY_SECRET}"',
    )
    env = loopback_env({"MY_SECRET": SECRET, "OTHER_SECRET": OTHER_SECRET})
    result = run_cli(command, "--instances", folder, "--config", config, cwd=tmp_path, env=env)
    assert result.returncode == 2, result
    output = result.stdout + result.stderr
    assert SECRET not in output and OTHER_SECRET not in output, output
    assert log_lines(result.stderr, f"{folder / 'bot.toml'}: settings.port:", "${MY_SECRET}")
    assert log_lines(result.stderr, "conversation.concurrency:", "${OTHER_SECRET}")
    assert log_lines(result.stderr, f"{config}: shutdown_grace:", "${MY_SECRET}")
    assert not (tmp_path / "state").exists()


# -- 5. plugins ------------------------------------------------------------------------------------


def test_plugins_lists_drivers_agents_and_the_broken_ones(tmp_path: Path) -> None:
    result = run_cli("plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    drivers, agents = out.split("Agents (gateway.agents):")
    assert drivers.startswith("Drivers (gateway.drivers):")

    def row(section: str, name: str) -> str:
        found = [line for line in section.splitlines() if line.split()[:1] == [name]]
        assert len(found) == 1, f"{name!r} listed {len(found)} times in:\n{section}"
        return found[0]

    assert "Echo: A local chat over HTTP" in row(drivers, "echo")
    broken = row(drivers, "broken")
    assert "FAILED TO LOAD" in broken
    assert "ModuleNotFoundError" in broken and "gateway_testkit_missing_dependency" in broken
    not_a_driver = row(drivers, "not-a-driver")
    assert "FAILED TO LOAD" in not_a_driver and "is not a Driver class" in not_a_driver
    assert "Echo: Repeats the message" in row(agents, "echo")
    assert "Scripted" in row(agents, "scripted")
    assert "FAILED" not in agents


def test_plugins_name_the_distribution_and_version_of_each_plugin(tmp_path: Path) -> None:
    result = run_cli("plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    drivers, agents = out.split("Agents (gateway.agents):")
    version = importlib.metadata.version
    expected = [
        (drivers, "echo", "imgateway-echo", version("imgateway-echo")),
        (drivers, "broken", "imgateway-testkit", version("imgateway-testkit")),
        (agents, "echo", "imgateway", version("imgateway")),
        (agents, "scripted", "imgateway-testkit", version("imgateway-testkit")),
    ]
    for section, name, distribution, dist_version in expected:
        pattern = rf"^\s+{re.escape(name)}\s+{re.escape(distribution)} {re.escape(dist_version)}\s"
        assert re.search(pattern, section, re.MULTILINE), (
            f"{name}: {distribution} {dist_version}?\n{out}"
        )


# -- 6. new ----------------------------------------------------------------------------------------


async def test_new_writes_an_instance_that_checks_and_runs(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    folder = tmp_path / "bots"
    result = run_cli("new", "echo", "mybot", "--instances", folder, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = folder / "mybot.toml"
    assert result.stdout.strip() == f"wrote {path}"
    text = path.read_text()
    assert 'type = "echo"' in text and "[settings]" in text and "# port = 0" in text

    checked = run_cli("check", "--instances", folder, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "mybot: echo driver, echo agent (enabled)" in checked.stdout

    # As written (port 0, terminal "auto" with no terminal on stdin) it runs: the log gives the URL.
    (tmp_path / "gateway.toml").write_text('state_dir = "state"\n')
    gateway = gateways.start("run", "--instances", folder, cwd=tmp_path)
    found = re.search(
        r"\[mybot\] gateway: echo listening on http://127\.0\.0\.1:(\d+)",
        await gateway.wait_log(lambda err: "echo listening on" in err),
    )
    assert found, gateway.describe()
    port = int(found.group(1))
    async with EchoClient(port) as client:
        events = await client.ask("hi", "n1")
    assert events[-1] == ("final", {"event": "final", "text": "hi", "parts": 1})
    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(5) == 0, gateway.describe()
    assert (tmp_path / "state" / "gateway.sqlite3").exists()  # relative to gateway.toml


def test_new_with_another_agent(tmp_path: Path) -> None:
    folder = tmp_path / "bots"
    result = run_cli(
        "new", "echo", "bot", "--agent", "scripted", "--instances", folder, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert '[agent]\ntype = "scripted"' in (folder / "bot.toml").read_text()
    checked = run_cli("check", "--instances", folder, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "bot: echo driver, scripted agent (enabled)" in checked.stdout


def test_new_does_not_overwrite_without_force(tmp_path: Path) -> None:
    folder = tmp_path / "bots"
    assert run_cli("new", "echo", "mybot", "--instances", folder, cwd=tmp_path).returncode == 0
    path = folder / "mybot.toml"
    edited = path.read_text() + "# my own edits\n"
    path.write_text(edited)

    again = run_cli("new", "echo", "mybot", "--instances", folder, cwd=tmp_path)
    assert again.returncode == 2
    assert f"{path} exists" in again.stderr and "--force" in again.stderr
    assert path.read_text() == edited

    forced = run_cli("new", "echo", "mybot", "--instances", folder, "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert "# my own edits" not in path.read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("new", "no-such-driver", "x"), "unknown driver type 'no-such-driver' (available: "),
        (("new", "echo", "x", "--agent", "no-such-agent"), "unknown agent type 'no-such-agent'"),
        (("new", "broken", "x"), "gateway_testkit_missing_dependency"),
        (("new", "echo", "bad name"), "'bad name'"),
        (("new", "echo", "../escape"), "'../escape'"),
    ],
    ids=["unknown-driver", "unknown-agent", "broken-driver", "bad-name", "path-in-name"],
)
def test_new_refuses_what_cannot_work(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    folder = tmp_path / "deep" / "bots"
    result = run_cli(*args, "--instances", folder, cwd=tmp_path)
    assert result.returncode == 2, result
    assert message in result.stderr
    if args[1] == "no-such-driver":
        assert "echo" in result.stderr.split("available:")[1]
    assert not (tmp_path / "deep").exists()  # nothing written, not even the folder


def test_new_refuses_a_name_taken_by_a_json_instance(tmp_path: Path) -> None:
    folder = tmp_path / "bots"
    folder.mkdir()
    (folder / "mybot.json").write_text(json.dumps({"type": "echo"}))
    result = run_cli("new", "echo", "mybot", "--instances", folder, "--force", cwd=tmp_path)
    assert result.returncode == 2, result
    assert "mybot.json" in result.stderr
    assert not (folder / "mybot.toml").exists()


# -- 7. run refuses invalid configuration ----------------------------------------------------------


@pytest.mark.parametrize(
    ("driver", "message"),
    [
        ("broken", "ModuleNotFoundError: No module named 'gateway_testkit_missing_dependency'"),
        ("not-a-driver", "is not a Driver class"),
        ("no-such-driver", "unknown driver type 'no-such-driver'"),
    ],
)
async def test_run_with_an_unusable_driver_exits_2_and_starts_nothing(
    tmp_path: Path, gateways: GatewayProcesses, driver: str, message: str
) -> None:
    folder, _ = setup_folder(
        tmp_path, {"good": echo_instance(free_port()), "bad": f'type = "{driver}"\n'}
    )
    gateway = start_gateway(gateways, tmp_path)
    assert await gateway.wait_exit(20) == 2, gateway.describe()
    stderr = gateway.stderr
    assert log_lines(stderr, f"{folder / 'bad.toml'}: type: ", message), stderr
    assert "starting" not in stderr and "listening" not in stderr
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("missing", ["instances", "config"])
def test_run_with_a_missing_path_exits_2(tmp_path: Path, missing: str) -> None:
    folder, config = setup_folder(tmp_path, {"bot": echo_instance(free_port())})
    if missing == "instances":
        folder = tmp_path / "missing-dir"
    else:
        config = tmp_path / "missing.toml"
    result = run_cli("run", "--instances", folder, "--config", config, cwd=tmp_path, timeout=20)
    assert result.returncode == 2, result
    gone = folder if missing == "instances" else config
    assert "not found" in result.stderr and str(gone) in result.stderr
    assert not (tmp_path / "state").exists()


# -- 8. isolation ----------------------------------------------------------------------------------


async def test_instance_that_cannot_listen_keeps_retrying_without_disturbing_the_other(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    taken_port, good_port = free_port(), free_port()
    reconnect = "[reconnect]\ninitial_delay = 0.05\nmax_delay = 0.2"
    setup_folder(
        tmp_path,
        {
            "taken": echo_instance(taken_port, extra=reconnect),
            "good": echo_instance(good_port, extra=reconnect),
        },
    )
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", taken_port))
        blocker.listen()
        gateway = start_gateway(gateways, tmp_path)
        await gateway.wait_http(f"http://127.0.0.1:{good_port}")
        await gateway.wait_log(lambda err: len(log_lines(err, "[taken]", "reconnecting in")) >= 3)

        async with EchoClient(good_port) as client:
            assert_answer(await client.ask("still answering", "g1"), "still answering")

        stderr = gateway.stderr
        failures = log_lines(
            stderr, "ERROR", "[taken]", f"echo cannot listen on 127.0.0.1:{taken_port}"
        )
        assert len(failures) == 1, stderr  # reported once, not at every retry
        assert not log_lines(stderr, "[good]", "ERROR"), stderr
        assert "Traceback" not in stderr
    finally:
        blocker.close()

    # Once the port is free the instance recovers by itself, without a restart.
    await gateway.wait_http(f"http://127.0.0.1:{taken_port}")
    async with EchoClient(taken_port) as client:
        assert_answer(await client.ask("back again", "t1"), "back again")
    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(5) == 0, gateway.describe()


# -- 9. secrets in a debug run ---------------------------------------------------------------------


async def test_debug_run_never_logs_values_from_the_environment(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    port = free_port()
    folder, _ = setup_folder(
        tmp_path,
        {
            "bot": 'description = "${DOTENV_SECRET}"\n'
            + echo_instance(port, settings='terminal_sender = "${MY_SECRET}"'),
        },
    )
    (folder / ".env").write_text(f"DOTENV_SECRET={OTHER_SECRET}\n")
    env = loopback_env({"MY_SECRET": SECRET}, drop=["DOTENV_SECRET"])
    gateway = start_gateway(gateways, tmp_path, env=env, global_args=("--log-level", "debug"))
    await gateway.wait_http(f"http://127.0.0.1:{port}")
    async with EchoClient(port) as client:
        assert_answer(await client.ask("tell me a secret", "s1"), "tell me a secret")
        status, _ = await client.get("no-such-message")
        assert status == 404
    gateway.send(signal.SIGTERM)
    assert await gateway.wait_exit(5) == 0, gateway.describe()

    output = gateway.stdout + gateway.stderr
    assert "DEBUG" in output  # the debug level was on
    assert SECRET not in output and OTHER_SECRET not in output, output


# -- history survives a restart of the real process -----------------------------------------------


async def test_history_survives_a_restart_of_the_gateway(
    tmp_path: Path, gateways: GatewayProcesses
) -> None:
    port = free_port()
    instance = echo_instance(port).replace(
        'type = "echo"\ndelay = 0.05',
        'type = "python"\ncallable = "gateway_testkit.python_agents:show_history"',
    )
    setup_folder(tmp_path, {"bot": instance})
    first = start_gateway(gateways, tmp_path)
    await first.wait_http(f"http://127.0.0.1:{port}")
    async with EchoClient(port) as client:
        events = await client.ask("remember me", "h1")
        assert events[-1][1]["text"] == "[]"  # no history yet
    first.send(signal.SIGTERM)
    assert await first.wait_exit(5) == 0, first.describe()

    second = start_gateway(gateways, tmp_path)
    await second.wait_http(f"http://127.0.0.1:{port}")
    async with EchoClient(port) as client:
        events = await client.ask("and now?", "h2")
    history = json.loads(str(events[-1][1]["text"]))
    assert history == [{"question": "remember me", "answer": "[]"}]
    second.send(signal.SIGTERM)
    assert await second.wait_exit(5) == 0, second.describe()
