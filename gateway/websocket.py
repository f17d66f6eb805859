"""Helpers for drivers whose platform talks over one websocket (DingTalk Stream, Feishu's long
connection): reading it under the serve() contract, and the tasks that handle its frames."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp

from gateway.errors import ConnectionLost

__all__ = ["DRAIN_TIMEOUT", "FrameTasks", "messages"]

#: How long :meth:`FrameTasks.drain` waits for frames being handled (an inbox write takes
#: milliseconds; a second covers a busy disk without stretching the shutdown much).
DRAIN_TIMEOUT = 1.0

_ENDED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


async def messages(
    ws: aiohttp.ClientWebSocketResponse,
    *,
    timeout: float,
    platform: str,
    closing: Callable[[], bool],
) -> AsyncIterator[aiohttp.WSMessage]:
    """The TEXT and BINARY messages of ``ws``, until it ends.

    Ends quietly when the driver is ``closing()``; otherwise raises
    :class:`~gateway.errors.ConnectionLost` when the server closes the socket, when it fails, or
    when nothing at all arrived for ``timeout`` seconds (a dead socket).  Websocket-level pings
    and pongs are aiohttp's business and never reach the caller.
    """
    while True:
        try:
            msg = await ws.receive(timeout=timeout)
        except TimeoutError:
            raise ConnectionLost(f"no frame from {platform} for {timeout:g} s") from None
        if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            yield msg
        elif msg.type in _ENDED:
            if closing():
                return
            raise ConnectionLost(f"connection closed by {platform} (code {ws.close_code})")
        elif msg.type is aiohttp.WSMsgType.ERROR:
            if closing():
                return
            # The exception is None for some failures (a frame over the size limit): then the
            # message's data says what happened.
            raise ConnectionLost(f"connection to {platform} failed: {ws.exception() or msg.data}")


class FrameTasks:
    """The tasks handling frames, so the inbox write of one frame never holds up the next one (and
    the core can batch concurrent writes into one commit).

    When the session ends because the connection is gone, :meth:`cancel` them: their ACKs could not
    be sent anyway.  When the driver closes, :meth:`drain` them *before* closing the socket: a
    message that is being stored must still be ACKed, or the platform pushes it again, perhaps to
    another replica, which answers it a second time.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Give the running tasks up to ``timeout`` seconds to finish, then cancel what is left.

        Only the tasks running when it is called are waited for: frames that arrive meanwhile meet
        a core that no longer accepts messages (``ShuttingDown``), are not ACKed and come again.
        A bounded wait, so a stuck inbox cannot hold up the shutdown."""
        running = set(self._tasks)
        if running and timeout > 0:
            await asyncio.wait(running, timeout=timeout)
        await self.cancel()

    async def cancel(self) -> None:
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
