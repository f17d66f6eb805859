"""A reply channel that records what the core asked of it (for pacing and runtime tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.driver import ReplyChannel


class RecordingChannel(ReplyChannel):
    """Records calls as (part index, method, text, ...) tuples in ``log``, shared with follow-ups.

    The reply is done (``done`` set, ``on_done`` called) at the last ``finish`` or a ``fail``.

    ``delay`` makes every call take that long (a slow platform); ``fail_on`` names methods that raise.
    ``max_in_flight`` records the most calls that were ever running at once (must stay 1).
    """

    def __init__(
        self,
        *,
        delay: float = 0.0,
        fail_on: frozenset[str] = frozenset(),
        index: int = 0,
        root: RecordingChannel | None = None,
    ) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.index = index
        self.root = root or self
        self.log: list[tuple[object, ...]] = []
        self.times: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.done = asyncio.Event()
        self.on_done: list[Callable[[], None]] = []

    def _mark_done(self) -> None:
        root = self.root
        if not root.done.is_set():
            root.done.set()
            for callback in root.on_done:
                callback()

    async def _record(self, *entry: object) -> None:
        root = self.root
        root.in_flight += 1
        root.max_in_flight = max(root.max_in_flight, root.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            root.times.append(asyncio.get_running_loop().time())
            root.log.append((self.index, *entry))
            if entry[0] in self.fail_on:
                raise RuntimeError(f"{entry[0]} failed on purpose")
        finally:
            root.in_flight -= 1

    async def start(self) -> None:
        await self._record("start")

    async def update(self, text: str) -> None:
        await self._record("update", text)

    async def finish(self, text: str, *, last: bool, feedback: bool) -> None:
        await self._record("finish", text, feedback)
        if last:
            self._mark_done()

    async def fail(self, text: str, error: str) -> None:
        try:
            await self._record("fail", text, error)
        finally:
            self._mark_done()

    def follow_up(self, index: int) -> RecordingChannel:
        return RecordingChannel(delay=self.delay, fail_on=self.fail_on, index=index, root=self.root)

    def calls(self, method: str) -> list[tuple[object, ...]]:
        return [entry for entry in self.root.log if entry[1] == method]
