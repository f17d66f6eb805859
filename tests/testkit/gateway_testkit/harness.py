"""Platform harnesses: the *platform side* of a driver, for the driver contract suite.

The contract suite (``tests/contract``) runs the real core with a real driver and checks what the
platform sees.  Each driver provides a harness here that sends messages as its platform would and reads
back what the platform shows; the suite is written only against this interface, so every driver (echo
now, DingTalk and Feishu with their emulators) runs the same tests.
"""

from __future__ import annotations

import abc
import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs

from gateway.models import Incoming

__all__ = ["EchoHarness", "PlatformHarness", "ReplyView", "free_port"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.frozen
class ReplyView:
    """A reply as the platform shows it to the user."""

    state: str  # "none" | "thinking" | "streaming" | "final" | "failed"
    text: str  # all parts joined
    parts: int
    updates: int  # visible intermediate states the platform received
    error: str = ""

    @property
    def ended(self) -> bool:
        return self.state in ("final", "failed")


class PlatformHarness(abc.ABC):
    """The platform end of one driver instance."""

    driver_type: str
    #: the part size the harness configures, so the suite can test splitting
    max_text_length: int
    #: the instance name the suite gives the driver
    instance: str = "bot"

    async def start(self) -> None:
        """Start the platform side (an emulator); called before the gateway starts."""

    async def close(self) -> None:
        """Stop the platform side."""

    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """The instance file's ``[settings]`` table for a driver talking to this platform."""

    @abc.abstractmethod
    async def send(
        self, text: str, *, sender: str = "u1", conversation: str = "c1", message_id: str = ""
    ) -> str:
        """Deliver a message as the platform does; return its id once the driver acknowledged it."""

    @abc.abstractmethod
    async def redeliver(self, message_id: str) -> None:
        """Deliver ``message_id`` again, as the platform does when it missed the ACK; return once it
        was acknowledged."""

    @abc.abstractmethod
    async def reply(self, message_id: str) -> ReplyView:
        """What the platform shows as the reply to ``message_id`` now."""

    @abc.abstractmethod
    async def click_feedback(self, message_id: str, user: str, rating: str) -> None:
        """A user clicks a feedback button on the final reply."""

    @abc.abstractmethod
    def leftover(self, message_id: str, text: str) -> Incoming:
        """A message as the driver would have stored it before a crash (for the resume test)."""

    def reply_id(self, message_id: str) -> str:
        return Incoming.create(
            instance=self.instance,
            message_id=message_id,
            conversation_id="-",
            sender_id="-",
            text="",
        ).reply_id

    async def wait_reply(self, message_id: str, timeout: float = 10.0) -> ReplyView:
        """Poll until the reply has ended (final or failed)."""
        async with asyncio.timeout(timeout):
            while True:
                view = await self.reply(message_id)
                if view.ended:
                    return view
                await asyncio.sleep(0.02)


class EchoHarness(PlatformHarness):
    """For the echo driver the platform is its own HTTP endpoint."""

    driver_type = "echo"
    max_text_length = 120

    def __init__(self) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._session: aiohttp.ClientSession | None = None
        self._streams: set[asyncio.Task[None]] = set()

    def settings(self) -> dict[str, Any]:
        return {"port": self.port, "terminal": "off", "max_text_length": self.max_text_length}

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def close(self) -> None:
        for task in self._streams:
            task.cancel()
        await asyncio.gather(*self._streams, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "start() the harness first"
        return self._session

    async def _post(self, body: dict[str, Any]) -> str:
        """POST a message; return the first SSE event name once the driver answered the request
        (which it does only after the core stored the message), reading the rest in background."""
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def consume() -> None:
            try:
                async with self.session.post(f"{self.base}/messages", json=body) as response:
                    if response.status != 200:
                        ready.set_result(f"http {response.status}")
                        return
                    async for name in _sse_events(response):
                        if not ready.done():
                            ready.set_result(name)
            except Exception as exc:
                if not ready.done():
                    ready.set_exception(exc)

        task = asyncio.create_task(consume())
        self._streams.add(task)
        task.add_done_callback(self._streams.discard)
        return await asyncio.wait_for(ready, 10)

    async def send(
        self, text: str, *, sender: str = "u1", conversation: str = "c1", message_id: str = ""
    ) -> str:
        message_id = message_id or uuid.uuid4().hex
        body = {"text": text, "sender": sender, "conversation": conversation, "id": message_id}
        first = await self._post(body)
        if first.startswith("http"):
            raise AssertionError(f"the echo endpoint refused the message: {first}")
        return message_id

    async def redeliver(self, message_id: str) -> None:
        first = await self._post({"text": "(redelivered)", "id": message_id})
        if first != "duplicate":
            raise AssertionError(f"redelivery of {message_id} was answered with {first!r}")

    async def reply(self, message_id: str) -> ReplyView:
        async with self.session.get(f"{self.base}/messages/{message_id}") as response:
            if response.status == 404:
                return ReplyView("none", "", 0, 0)
            data = await response.json()
        events = data["events"]
        names = [e["event"] for e in events]
        state = {"final": "final", "failed": "failed"}.get(data["state"], data["state"])
        error = next((e["error"] for e in events if e["event"] == "error"), "")
        parts = max((e.get("index", 0) for e in events), default=0) + 1
        return ReplyView(state, data["text"], parts, names.count("update"), error)

    def leftover(self, message_id: str, text: str) -> Incoming:
        body = {"text": text, "id": message_id}
        return Incoming.create(
            instance=self.instance,
            message_id=message_id,
            conversation_id="c1",
            sender_id="u1",
            text=text,
            raw=body,
        )

    async def click_feedback(self, message_id: str, user: str, rating: str) -> None:
        body = {"message_id": message_id, "user": user, "rating": rating}
        async with self.session.post(f"{self.base}/feedback", json=body) as response:
            if response.status >= 300:
                raise AssertionError(f"feedback refused: {response.status} {await response.text()}")


async def _sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    name = ""
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            json.loads(line[5:])  # a malformed event is a driver bug: let it fail loudly
        elif not line and name:
            yield name
            name = ""
