"""An in-memory driver: the platform is this object, so runtime tests can drive the core directly.

Also installed as the ``memory`` driver (entry point) for end-to-end tests of the core's reactions
to a faulty driver: ``init_error`` and ``send_error`` are test seams, nothing a real driver has.
"""

from __future__ import annotations

import asyncio
import itertools

import attrs

from gateway.driver import Capabilities, Driver, ReplyChannel
from gateway.models import Incoming, Outgoing
from gateway_testkit.channels import RecordingChannel


@attrs.frozen
class MemorySettings:
    #: serve() raises this many times before it connects (a platform that is down at start)
    fail_first: int = 0
    #: serve() raises after connecting instead of staying up (a crashing driver)
    crash: bool = False
    max_text_length: int = 0
    edits: bool = True
    #: the constructor raises RuntimeError(init_error) (an instance that cannot even start)
    init_error: str = ""
    #: send() raises RuntimeError(send_error) (a driver bug on the outbound path)
    send_error: str = ""


class MemoryDriver(Driver):
    title = "Memory"
    description = "In-memory test driver."
    settings_class = MemorySettings
    settings: MemorySettings
    _ids = itertools.count(1)

    def __init__(self, settings: MemorySettings, context: object) -> None:
        if settings.init_error:
            raise RuntimeError(settings.init_error)
        super().__init__(settings, context)  # type: ignore[arg-type]
        self.replies: dict[str, RecordingChannel] = {}
        self.sent: list[Outgoing] = []  # proactive messages, in order
        self.finished: list[str] = []  # message ids in the order their replies ended
        self.serves = 0
        self.closed = asyncio.Event()

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return Capabilities(
            edits=self.settings.edits,
            feedback=True,
            proactive=True,
            max_text_length=self.settings.max_text_length or None,
        )

    async def serve(self) -> None:
        self.serves += 1
        if self.serves <= self.settings.fail_first:
            raise ConnectionRefusedError("platform down")
        self.context.connected()
        if self.settings.crash:
            raise RuntimeError("driver bug")
        await self.closed.wait()

    async def close(self) -> None:
        self.closed.set()

    async def send(self, message: Outgoing) -> str:
        if self.settings.send_error:
            raise RuntimeError(self.settings.send_error)
        self.sent.append(message)
        return f"sent-{len(self.sent)}"

    def open_reply(self, message: Incoming) -> ReplyChannel:
        channel = self.replies.get(message.message_id)
        if channel is None:
            channel = self.replies[message.message_id] = RecordingChannel()
            channel.on_done.append(lambda: self.finished.append(message.message_id))
        return channel

    async def inject(
        self, text: str, *, sender: str = "u1", conversation: str = "c1", message_id: str = ""
    ) -> bool:
        message = Incoming.create(
            instance=self.context.instance,
            message_id=message_id or f"m{next(self._ids)}",
            conversation_id=conversation,
            sender_id=sender,
            text=text,
        )
        return await self.context.deliver(message)

    async def wait_done(self, message_id: str, timeout: float = 5.0) -> RecordingChannel:
        async with asyncio.timeout(timeout):
            while message_id not in self.replies:
                await asyncio.sleep(0.005)
            channel = self.replies[message_id]
            await channel.done.wait()
        return channel


__all__ = ["MemoryDriver", "MemorySettings"]
