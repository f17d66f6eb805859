"""Showing one streamed answer on one reply channel: pacing, splitting, and a final state that lands.

Agents produce chunks far faster than platforms accept edits (DingTalk cards: a few per second per app
before 403s).  :class:`ReplyStream` therefore sends updates from one worker task per reply:

* **single-flight**: one call to the platform at a time per reply, so updates never race or reorder;
* **latest-wins**: text that arrives while a call is in flight replaces older pending text, so a slow
  platform sees fewer, fuller updates instead of a growing backlog;
* **paced**: at most one update per ``interval`` seconds (optionally earlier after N chunks), and an
  optional cap on the number of updates (the reference design's 20; the last one is kept for the final
  text — once spent, long answers freeze until the end, which is why it is off by default);
* **split**: text beyond the platform's size limit is cut at a good boundary (``gateway.splitter``);
  the full part is finished and the answer continues in a follow-up reply;
* **final**: success, error, cancellation and shutdown all end in ``finish`` or ``fail``; if the final
  call itself fails, ``fail`` is tried so no reply stays on "thinking…".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from gateway.config.instance import ReplySettings
from gateway.driver import Capabilities, ReplyChannel
from gateway.splitter import cut

__all__ = ["PacingPolicy", "ReplyStream"]


@attrs.frozen
class PacingPolicy:
    interval: float = 1.0
    max_updates: int = 0
    every_chunks: int = 0

    @classmethod
    def from_settings(cls, settings: ReplySettings) -> PacingPolicy:
        return cls(settings.update_interval, settings.max_updates, settings.update_every_chunks)


@attrs.frozen
class _Final:
    text: str
    error: str | None  # None: success


class ReplyStream:
    """The visible reply to one message.  Create, :meth:`open`, :meth:`push` text, then
    :meth:`finish` or :meth:`fail` (both wait until the final state has been sent)."""

    def __init__(
        self,
        channel: ReplyChannel,
        *,
        policy: PacingPolicy,
        capabilities: Capabilities,
        feedback: bool,
        logger: logging.LoggerAdapter[logging.Logger],
        message_id: str = "",
    ) -> None:
        self._channel = channel
        self._policy = policy
        self._editable = capabilities.edits
        self._limit = capabilities.max_text_length
        self._feedback = feedback and capabilities.feedback
        self._log = logger
        self._message_id = message_id
        self._text = ""
        self._chunks = 0  # pushes since the last update
        self._final: _Final | None = None
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        # Where the current part starts in the full text, and what it is prefixed with (a reopened
        # code fence); parts before it were finished already.
        self._base = 0
        self._carry = ""
        self._part = 0
        self._shown = ""
        self._updates = 0
        self._last_call = float("-inf")
        self.outcome_text = ""

    def open(self) -> None:
        """Start the worker; shows the placeholder right away if the platform can edit."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run())

    def push(self, text: str) -> None:
        """The answer so far (the whole text, not a delta).  Never blocks."""
        if self._final is None:
            self._text = text
            self._chunks += 1
            self._wake.set()

    async def finish(self, text: str) -> None:
        await self._end(_Final(text, None))

    async def fail(self, text: str, error: str) -> None:
        await self._end(_Final(text, error))

    async def _end(self, final: _Final) -> None:
        if self._final is None:
            self._final = final
            self._wake.set()
        self.open()
        assert self._worker is not None
        # Shielded: the caller may be cancelled (shutdown), the final state must still be sent.
        await asyncio.shield(self._worker)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        if self._editable:
            await self._call("start", self._channel.start)
        while self._final is None:
            await self._wake.wait()
            self._wake.clear()
            if self._final is not None or not self._editable or self._capped():
                continue
            if not self._chunks_due():
                delay = self._last_call + self._policy.interval - loop.time()
                if delay > 0 and await self._ended_within(delay):
                    break
            if self._text != self._shown:
                self._chunks = 0
                await self._show(self._text)
                self._updates += 1
        assert self._final is not None
        if self._editable and self._updates:
            # The final edit respects the pacing interval after an update: platforms limit edits
            # per message.  Straight after the placeholder it does not wait: a quick answer would
            # sit on "thinking…" for a whole interval, and waiting saves no call.
            delay = self._last_call + self._policy.interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await self._show_final(self._final)

    def _capped(self) -> bool:
        # The last allowed update is reserved for the final text.
        return bool(self._policy.max_updates) and self._updates >= self._policy.max_updates - 1

    def _chunks_due(self) -> bool:
        return bool(self._policy.every_chunks) and self._chunks >= self._policy.every_chunks

    async def _ended_within(self, delay: float) -> bool:
        """Wait up to ``delay`` (less if enough chunks arrive); True if the reply was ended meanwhile
        (then pacing stops and the final state is sent)."""
        try:
            async with asyncio.timeout(delay):
                while self._final is None and not self._chunks_due():
                    await self._wake.wait()
                    self._wake.clear()
        except TimeoutError:
            return False
        return self._final is not None

    async def _flush_full_parts(self, text: str) -> str:
        """Finish every part that is full, return what remains visible in the current part."""
        visible = self._carry + text[self._base :]
        while self._limit and len(visible) > self._limit:
            part, carry = cut(text[self._base :], self._limit, prefix=self._carry)
            await self._call("finish", self._channel.finish, part.text, last=False, feedback=False)
            self._base += len(part.body)
            self._carry = carry
            self._part += 1
            self._channel = self._channel.follow_up(self._part)
            visible = self._carry + text[self._base :]
        return visible

    async def _show(self, text: str) -> None:
        visible = await self._flush_full_parts(text)
        self._shown = text
        await self._call("update", self._channel.update, visible)

    async def _show_final(self, final: _Final) -> None:
        visible = await self._flush_full_parts(final.text)
        self.outcome_text = final.text
        if final.error is None:
            if await self._call(
                "finish", self._channel.finish, visible, last=True, feedback=self._feedback
            ):
                return
            error = "The answer could not be shown completely."
        else:
            error = final.error
        if not await self._call("fail", self._channel.fail, visible, error):
            self._log.error(
                "reply to message %s could not be finalised; the platform may still show it as "
                "in progress",
                self._message_id,
                extra={"message_id": self._message_id, "event": "reply_lost"},
            )

    async def _call(
        self, what: str, method: Callable[..., Awaitable[Any]], *args: Any, **kw: Any
    ) -> bool:
        try:
            await method(*args, **kw)
        except Exception as exc:
            self._log.warning(
                "reply %s for message %s failed: %s: %s",
                what,
                self._message_id,
                type(exc).__name__,
                exc,
                extra={"message_id": self._message_id, "event": f"reply_{what}_failed"},
            )
            return False
        finally:
            self._last_call = asyncio.get_running_loop().time()
        return True
