"""Building blocks of the platform emulators the drivers ship (``gateway_<name>.emulator``).

An emulator plays a platform's server side on loopback: one aiohttp server, requests handed to
handlers as :class:`Call`\\ s, and tests waiting for what the client did.  These pieces live in
the core, not in the test kit, because the emulators are part of the plugin packages (any project
may test against them) and cannot import the test kit.  What the platform answers stays in each
emulator: nothing here knows a wire format.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, ClassVar, Protocol, Self, TypeVar

import attrs
from aiohttp import web

__all__ = [
    "Call",
    "LoopbackServer",
    "RecordedCall",
    "count_calls",
    "read_json",
    "started_emulators",
]

#: The largest request body an emulator accepts (file uploads, big cards): far above any
#: platform's limit, so the emulator's own checks, not aiohttp's, answer oversized bodies.
MAX_BODY = 16 * 2**20


@attrs.define(eq=False)
class Call:
    """One HTTP request as an emulator's handler sees it; ``app`` once the token was checked."""

    request: web.Request
    path: str
    body: Any
    app: str | None = None


async def read_json(request: web.Request) -> tuple[Any, bool]:
    """The request body parsed as JSON (None when empty), and whether it parsed.  A body that is
    not JSON comes back as text, so the call record shows what the client sent."""
    raw = await request.read()
    if not raw:
        return None, True
    try:
        return json.loads(raw), True
    except ValueError:
        return raw.decode(errors="replace"), False


class RecordedCall(Protocol):
    """What :func:`count_calls` reads of an emulator's call record."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def status(self) -> int: ...


def count_calls(
    calls: Iterable[RecordedCall],
    path_prefix: str,
    status: int | None = None,
    method: str | None = None,
) -> int:
    """How many of ``calls`` matched ``path_prefix`` (and ``status``/``method`` if given)."""
    return sum(
        1
        for call in calls
        if call.path.startswith(path_prefix)
        and (status is None or call.status == status)
        and (method is None or call.method == method)
    )


class LoopbackServer(abc.ABC):
    """An emulator's server: ``start()``/``close()`` (or ``async with``), ``url``, and waiting
    for changes.

    A subclass gives its routes (:meth:`_routes`), closes its own connections
    (:meth:`_shut_down`), calls :meth:`_notify` whenever it records something a test may wait
    for, and names the error a test gets for a misuse (:attr:`error`).
    """

    #: raised for "not started yet" and "already started": the emulator's own error class
    error: ClassVar[type[Exception]] = RuntimeError

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        #: 0 until started (any free port); give the old port to restart on it
        self.port = port
        self._waiters: list[asyncio.Future[None]] = []
        self._runner: web.AppRunner | None = None
        self._url = ""

    @abc.abstractmethod
    def _routes(self) -> list[web.RouteDef]:
        """Every route the platform serves, a catch-all last."""

    @abc.abstractmethod
    async def _shut_down(self) -> None:
        """Stop background work and close the live connections; the server stops after it."""

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: where a client is pointed."""
        if not self._url:
            raise self.error("start() the emulator first")
        return self._url

    async def start(self) -> None:
        if self._runner is not None:
            raise self.error("the emulator is already started")
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_routes(self._routes())
        # shutdown_timeout: a test's close() must not wait for a client that never hangs up.
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.port = port
        self._url = f"http://{host}:{port}"

    async def close(self) -> None:
        """Close every connection (see :meth:`_shut_down`) and stop serving; again is a no-op."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        await self._shut_down()
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _notify(self) -> None:
        """Something changed: wake every :meth:`_wait_for` to check its predicate again."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_for(
        self, predicate: Callable[[], bool], timeout: float, *, quiet: bool = False
    ) -> None:
        """Wait until ``predicate()`` holds (re-checked on every change and every 50 ms, for
        what changes without a :meth:`_notify`, such as time); ``TimeoutError`` after
        ``timeout`` seconds (``inf``: no limit) unless ``quiet``."""
        try:
            async with asyncio.timeout(None if timeout == float("inf") else timeout):
                while not predicate():
                    waiter = asyncio.get_running_loop().create_future()
                    self._waiters.append(waiter)
                    # Not asyncio.wait_for: on Python 3.11 it can swallow the cancellation of the
                    # enclosing timeout when the waiter is set in the same loop turn, and the wait
                    # then never ends (seen: the Feishu emulator's re-push loop stalled for good).
                    await asyncio.wait([waiter], timeout=0.05)
                    if not waiter.done():
                        waiter.cancel()
                        self._waiters.remove(waiter)
        except TimeoutError:
            if not quiet:
                raise

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` is true (e.g. ``lambda: len(emu.calls) > 2``)."""
        await self._wait_for(predicate, timeout)


ServerT = TypeVar("ServerT", bound=LoopbackServer)


@contextlib.asynccontextmanager
async def started_emulators(
    make: Callable[..., ServerT],
) -> AsyncIterator[Callable[..., Awaitable[ServerT]]]:
    """``await start(**kwargs)`` makes and starts an emulator; all are closed on the way out,
    newest first.  What an emulator's pytest factory fixture yields."""
    started: list[ServerT] = []

    async def start(**kwargs: Any) -> ServerT:
        emulator = make(**kwargs)
        await emulator.start()
        started.append(emulator)
        return emulator

    try:
        yield start
    finally:
        for emulator in reversed(started):
            await emulator.close()
