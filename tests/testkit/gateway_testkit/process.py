"""The real ``gateway`` command in a subprocess, and a client for echo's HTTP endpoint.

For end-to-end suites: every process started through :class:`GatewayProcesses` is killed when it is
closed (use it from a fixture's teardown), every wait has a deadline, output goes to files (a chatty
``--log-level debug`` run can never block on a full pipe), and clients talk to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

__all__ = [
    "GATEWAY",
    "EchoClient",
    "Event",
    "GatewayProcess",
    "GatewayProcesses",
    "SSEStream",
    "free_port",
    "loopback_env",
    "run_cli",
    "write_folder",
]

#: The command line of the ``gateway`` console script, run by the current interpreter.
GATEWAY = (sys.executable, "-m", "gateway.cli")

Event = tuple[str, dict[str, Any]]  # (SSE event name, its data)

_LOOPBACK = "127.0.0.1,localhost"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def loopback_env(
    extra: Mapping[str, str | None] | None = None, *, drop: Sequence[str] = ()
) -> dict[str, str]:
    """This process's environment for a child: no proxy for loopback, ``extra`` set (None removes a
    variable), ``drop`` removed."""
    env = dict(os.environ)
    env.update(NO_PROXY=_LOOPBACK, no_proxy=_LOOPBACK, PYTHONUNBUFFERED="1")
    for name in drop:
        env.pop(name, None)
    for name, value in (extra or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_cli(
    *args: str | os.PathLike[str],
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run one short ``gateway`` command to its end (check, plugins, new) and capture its output."""
    return subprocess.run(
        [*GATEWAY, *map(str, args)],
        cwd=cwd,
        env=dict(env) if env is not None else loopback_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class GatewayProcess:
    """One ``gateway`` process; stdout and stderr go to files in ``logs``."""

    def __init__(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        cwd: Path,
        env: Mapping[str, str],
        logs: Path,
    ) -> None:
        self.args = [*GATEWAY, *map(str, args)]
        self._stdout_path = logs.with_suffix(".stdout")
        self._stderr_path = logs.with_suffix(".stderr")
        with open(self._stdout_path, "wb") as out, open(self._stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                self.args, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def stdout(self) -> str:
        return self._stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self._stderr_path.read_text(errors="replace")

    def describe(self) -> str:
        """The command, its state and its output, for assertion messages."""
        return (
            f"{' '.join(self.args)} (pid {self.pid}, exit code {self.returncode})\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )

    def send(self, signum: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: no handler, no cleanup (a crash or the OOM killer)."""
        if self.popen.poll() is None:
            self.popen.kill()

    async def wait_exit(self, timeout: float) -> int:
        """The exit code; fails if the process is still running after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {timeout} s: {self.describe()}")
            await asyncio.sleep(0.02)
        return int(self.popen.returncode)

    async def wait_log(self, predicate: str | Callable[[str], bool], timeout: float = 20.0) -> str:
        """Wait until stderr contains ``predicate`` (a string, or a test of the whole stderr)."""
        check = predicate if callable(predicate) else (lambda text: predicate in text)
        deadline = time.monotonic() + timeout
        while True:
            text = self.stderr
            if check(text):
                return text
            if self.popen.poll() is not None:
                raise AssertionError(f"exited before logging {predicate!r}: {self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not logged within {timeout} s: {predicate!r}: {self.describe()}"
                )
            await asyncio.sleep(0.02)

    async def wait_http(self, base_url: str, timeout: float = 20.0) -> None:
        """Wait until echo's endpoint at ``base_url`` answers (``GET /messages/<unknown>`` is 404)."""
        deadline = time.monotonic() + timeout
        probe = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=probe) as session:
            while True:
                if self.popen.poll() is not None:
                    raise AssertionError(f"exited before {base_url} was up: {self.describe()}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(f"{base_url}/messages/--readiness-probe--") as response:
                        if response.status == 404:
                            return
                if time.monotonic() > deadline:
                    raise AssertionError(f"{base_url} not up within {timeout} s: {self.describe()}")
                await asyncio.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """Teardown: SIGKILL if still running, and reap it."""
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)


class GatewayProcesses:
    """Starts ``gateway`` processes and kills every one still running on :meth:`close`."""

    def __init__(self, logs: Path) -> None:
        self._logs = logs
        self._count = itertools.count(1)
        self.started: list[GatewayProcess] = []

    def start(
        self,
        *args: str | os.PathLike[str],
        cwd: Path,
        env: Mapping[str, str] | None = None,
    ) -> GatewayProcess:
        logs = self._logs / f"gateway-{next(self._count)}"
        process = GatewayProcess(
            args, cwd=cwd, env=env if env is not None else loopback_env(), logs=logs
        )
        self.started.append(process)
        return process

    def run_folder(self, root: Path, env: Mapping[str, str | None] | None = None) -> GatewayProcess:
        """``gateway run`` from ``root`` on the folder :func:`write_folder` made there; ``env`` is
        set over :func:`loopback_env`'s (an instance's secret, say)."""
        return self.start(
            "run",
            "--instances",
            root / "instances",
            "--config",
            root / "gateway.toml",
            cwd=root,
            env=loopback_env(env),
        )

    def close(self) -> None:
        for process in self.started:
            process.stop()

    def __enter__(self) -> GatewayProcesses:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def write_folder(
    root: Path,
    driver: str,
    settings: Mapping[str, str | float],
    *,
    delay: float,
    update_interval: float,
    grace: float,
    gateway_toml: str = "",
) -> None:
    """``root/instances/bot.toml``: ``driver`` with ``settings`` (strings may name ``${VARS}``),
    the echo agent answering after ``delay`` s, 32 conversations at once and fast reconnects; and
    ``root/gateway.toml``: state in ``root/state``, ``grace`` s to finish answers, then
    ``gateway_toml``."""
    folder = root / "instances"
    folder.mkdir(exist_ok=True)
    table = "\n".join(
        f"{key} = {json.dumps(value) if isinstance(value, str) else value}"
        for key, value in settings.items()
    )
    (folder / "bot.toml").write_text(
        f"""\
type = "{driver}"

[settings]
{table}

[agent]
type = "echo"
delay = {delay}

[reply]
update_interval = {update_interval}

[conversation]
concurrency = 32

[reconnect]
initial_delay = 0.05
max_delay = 0.5
"""
    )
    (root / "gateway.toml").write_text(
        f'state_dir = "state"\nshutdown_grace = {grace}\n{gateway_toml}'
    )


# -- echo's HTTP endpoint -------------------------------------------------------------------------


class SSEStream:
    """The server-sent events of one response, read one at a time with deadlines."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.events: list[Event] = []  # every event read so far
        self.broken: BaseException | None = None  # why the stream ended abruptly, if it did
        self._iter = self._parse().__aiter__()
        self.ended = False

    async def _parse(self) -> AsyncIterator[Event]:
        name, data = "", []
        try:
            async for raw in self.response.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    name = line[len("event:") :].strip()
                elif line.startswith("data:"):
                    data.append(line[len("data:") :].strip())
                elif not line and (name or data):
                    yield name or "message", json.loads("\n".join(data))
                    name, data = "", []
        except (
            aiohttp.ClientPayloadError,
            aiohttp.ServerDisconnectedError,
            ConnectionError,
        ) as exc:
            self.broken = exc  # the server went away mid-stream (a killed process)

    async def next(self, timeout: float = 20.0) -> Event | None:
        """The next event, or None at the end of the stream."""
        if self.ended:
            return None
        try:
            async with asyncio.timeout(timeout):
                event = await anext(self._iter)
        except StopAsyncIteration:
            self.ended = True
            return None
        self.events.append(event)
        return event

    async def until(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        """Read up to and including the first event called ``name``; return its data."""
        deadline = time.monotonic() + timeout
        while True:
            event = await self.next(max(0.0, deadline - time.monotonic()))
            if event is None:
                raise AssertionError(f"the stream ended without {name!r}: {self.names}")
            if event[0] == name:
                return event[1]

    async def rest(self, timeout: float = 20.0) -> list[Event]:
        """Read to the end of the stream; return every event read (from the start)."""
        deadline = time.monotonic() + timeout
        while await self.next(max(0.0, deadline - time.monotonic())) is not None:
            pass
        return self.events

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.events]


class EchoClient:
    """A client of one echo instance's HTTP endpoint on 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        # trust_env=False (the default) already ignores proxy variables; loopback only anyway.
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))

    async def close(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> EchoClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @contextlib.asynccontextmanager
    async def post(self, text: str, message_id: str, **fields: str) -> AsyncIterator[SSEStream]:
        """POST a message and follow its reply's event stream (the response must be 200)."""
        body = {"text": text, "id": message_id, **fields}
        async with self.session.post(f"{self.base}/messages", json=body) as response:
            if response.status != 200:
                raise AssertionError(f"POST /messages: {response.status} {await response.text()}")
            yield SSEStream(response)

    async def ask(self, text: str, message_id: str, timeout: float = 20.0) -> list[Event]:
        """POST a message and return every event of its reply, to the end of the stream."""
        async with self.post(text, message_id) as stream:
            return await stream.rest(timeout)

    async def get(self, message_id: str) -> tuple[int, dict[str, Any]]:
        async with self.session.get(f"{self.base}/messages/{message_id}") as response:
            return response.status, await response.json()

    async def wait_state(
        self, message_id: str, state: str, timeout: float = 20.0
    ) -> dict[str, Any]:
        """Poll ``GET /messages/{id}`` until the reply is in ``state`` (404s and refused connections
        are retried: the message may not be known yet, the gateway may be starting)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                status, body = await self.get(message_id)
                last = (status, body)
                if status == 200 and body["state"] == state:
                    return body
            if time.monotonic() > deadline:
                raise AssertionError(f"{message_id} not {state!r} within {timeout} s; last: {last}")
            await asyncio.sleep(0.05)
