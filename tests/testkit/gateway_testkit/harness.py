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
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, TypeVar, get_args

import aiohttp
import attrs

from gateway.models import Incoming

__all__ = [
    "API_FAULTS",
    "ApiFault",
    "EchoHarness",
    "FaultInjection",
    "FramePush",
    "PlatformHarness",
    "ReplyRecord",
    "ReplyView",
    "free_port",
    "instance_document",
    "pushed_again_if_cut",
]

T = TypeVar("T")


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

    def user_id(self, user: str) -> str:
        """The id the platform gives user ``user`` (as passed to :meth:`click_feedback`): the
        name itself, unless the platform derives ids (Feishu's ``open_id``)."""
        return user

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


def instance_document(
    harness: PlatformHarness, agent: dict[str, Any], **tables: dict[str, Any]
) -> dict[str, Any]:
    """An instance file's content (as a dict, for JSON) for a driver talking to ``harness``: quick
    pacing and reconnection, so tests never wait on a default meant for production; ``tables``
    (``conversation={...}``, ``reply={...}``...) are merged over those defaults."""
    document: dict[str, Any] = {
        "type": harness.driver_type,
        "settings": harness.settings(),
        "agent": agent,
        "reply": {"update_interval": 0.05},
        "reconnect": {"initial_delay": 0.05, "max_delay": 0.2},
    }
    for name, table in tables.items():
        document[name] = {**document.get(name, {}), **table}
    return document


async def pushed_again_if_cut(
    push: Callable[[], Awaitable[T]], cut: Callable[[Exception], bool], timeout: float = 5.0
) -> T:
    """Run ``push`` (an emulator pushing one message) again while it fails because its connection
    died under it (``cut(error)``: fault tests drop sockets), as a platform pushes a message again
    once it noticed, on a live connection.  Other errors, and a cut one after ``timeout``
    seconds, propagate."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await push()
        except Exception as exc:
            if not cut(exc) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)  # until the emulator has noticed the connection is gone


#: How a reply API call can fail (see :meth:`FaultInjection.fail_next_api_calls`).
ApiFault = Literal["token_expired", "rate_limited", "server_error"]
API_FAULTS: tuple[ApiFault, ...] = get_args(ApiFault)


@attrs.frozen
class ReplyRecord:
    """Exactly-once accounting of one message, from the platform's own record (what every user
    could see), not from the gateway's logs."""

    #: distinct replies the user sees for the message: cards, messages, edited or not.  An answer
    #: split into parts counts each part, so a short answer given once is exactly 1; a duplicated
    #: answer (a second card, a fallback message beside the card) is more.
    replies: int
    #: how many of those still show an answer in progress (a placeholder, "thinking", streaming):
    #: after the gateway is done with the message this must be 0, or the user waits forever.
    unfinished: int


@attrs.frozen
class FramePush:
    """One frame :meth:`FaultInjection.push_frame` pushed, and what the platform expects back."""

    #: True: an ACK (the frame is whole and carries the fresh id the harness gave it); False: none
    #: (a frame a client cannot read an id from, a part of a payload still incomplete); None:
    #: either is fine (an id the platform would never send, a count of parts that is not a
    #: number...), as long as nothing crashes
    expects_ack: bool | None
    #: the emulator's record of the push: its ``ack`` is set once the ACK frame arrives
    record: Any = attrs.field(default=None, repr=False)
    #: what the frame was, shortened, for failure messages
    summary: str = ""

    @property
    def ack(self) -> Any:
        """The ACK frame the platform received for this push (its record), or None."""
        return getattr(self.record, "ack", None)


class FaultInjection(PlatformHarness):
    """A platform harness whose platform (an emulator on loopback) can misbehave on request.

    The fault-injection suite (``tests/faults``) is written against this interface only, so every
    driver with an emulator runs the same faults.  Faults are the platform's, never the gateway's:
    the gateway under test is a black box that must survive them.  Unless a method says otherwise,
    a fault applies from the call on and stays until it is switched off; nothing here waits for the
    gateway to react (tests poll :meth:`connections`, :meth:`reply_record`, ``reply``...).

    ``send`` and ``redeliver`` keep their contract during outages: they wait (a few seconds) for a
    live connection, then for the ACK, so a message sent while the gateway reconnects is pushed as
    soon as it is back; a push that fails because its connection died under it (a drop while
    pushing) is pushed again on a live one, as the platform would (:func:`pushed_again_if_cut`).
    """

    # -- connections ---------------------------------------------------------------------------

    @abc.abstractmethod
    def connections(self) -> int:
        """How many connections of the gateway's app the platform holds open now (and would push
        messages to)."""

    @abc.abstractmethod
    async def drop_connections(self) -> int:
        """Abort every live connection at the TCP level (no close frame, no goodbye), as a network
        failure does; return how many were dropped, once the platform has forgotten them.  Frames
        pushed but not ACKed on them are delivered again after :meth:`redeliver_unacked_after`."""

    @abc.abstractmethod
    async def server_disconnect(self) -> int:
        """The platform's polite goodbye on every live connection (DingTalk: ``SYSTEM/disconnect``;
        a platform without one: a normal websocket close from the server).  New messages are no
        longer pushed to those connections; the platform closes them itself a few seconds later if
        the gateway did not.  Returns how many connections were told."""

    @abc.abstractmethod
    def refuse_connections(self, refuse: bool) -> None:
        """While ``refuse`` is true, every new connection attempt fails the way the platform fails
        it when its gateway is down (an HTTP 5xx on the handshake or its preliminary call);
        connections already open are left alone."""

    @abc.abstractmethod
    async def restart(self) -> None:
        """Stop the platform (every connection closed by the server, the port closed) and start it
        again on the same port.  What the platform keeps durably survives (the replies the user
        sees, the app's credentials, issued tokens); pushes in flight at the restart are not
        promised to be delivered again, so a test sends its messages before or after it."""

    @abc.abstractmethod
    def redeliver_unacked_after(self, seconds: float) -> None:
        """Push a message again (on any live connection) when it was not ACKed ``seconds`` after
        its last push, as often as needed until it is ACKed: the platform's at-least-once
        delivery, with a short timeout so tests do not wait for the real one."""

    # -- the reply API ---------------------------------------------------------------------------

    @abc.abstractmethod
    def fail_next_api_calls(self, count: int, fault: ApiFault) -> None:
        """Answer the next ``count`` calls to the reply API (creating, updating, streaming or
        finishing a reply; not tokens, not connections) with the platform's own error for
        ``fault``, without executing them:

        * ``token_expired``: the access token is rejected as invalid/expired (the gateway must get
          a new one and try again);
        * ``rate_limited``: the platform's per-app quota answer (the gateway must slow down);
        * ``server_error``: an HTTP 500 (transient: try again)."""

    @abc.abstractmethod
    def set_api_latency(self, seconds: float) -> None:
        """Answer every API call (tokens and replies alike) ``seconds`` late; 0 for no delay."""

    @abc.abstractmethod
    def set_rate_limit(self, per_second: float | None) -> None:
        """The platform's own quota on reply API calls, per app, in calls per second over a
        sliding second (as the platform counts it: per API where it does).  A call over it is
        rejected with the ``rate_limited`` answer and not executed.  ``None`` switches it off."""

    def paced_settings(self, per_second: float) -> dict[str, Any]:
        """:meth:`settings` with the driver's own limit on API calls set to ``per_second`` for the
        app (the gateway's per-app rate limiter).  The default sets ``rate``, the name every
        driver so far gives it; a driver calling it otherwise overrides this."""
        return {**self.settings(), "rate": per_second}

    @abc.abstractmethod
    def rate_limit_rejections(self) -> int:
        """How many calls :meth:`set_rate_limit`'s quota has rejected so far (faults planted with
        :meth:`fail_next_api_calls` are not counted)."""

    @abc.abstractmethod
    def expire_tokens(self) -> None:
        """Invalidate every access token the platform issued, now, as their expiry would: every
        API call made with one is rejected with the ``token_expired`` answer from then on, so
        nothing lands until the gateway fetches a new token (unlike ``fail_next_api_calls``,
        after which the old token works again)."""

    # -- raw input -------------------------------------------------------------------------------

    @abc.abstractmethod
    def sample_payload(
        self, text: str, *, message_id: str, sender: str = "u1", conversation: str = "c1"
    ) -> Any:
        """A valid raw message payload, as the platform sends it, for a text message: a JSON-able
        value (a dict).  ``push_raw`` of it unchanged is answered like ``send``; a mutated copy is
        hostile input.  The platform registers what the payload implies (the sender, the
        conversation, a reply address) so a valid payload can be answered."""

    @abc.abstractmethod
    async def push_raw(self, payload: Any, *, timeout: float = 5.0) -> bool:
        """Push ``payload`` as the platform frames a message event, on a live connection, once (no
        redelivery, so a bad payload is seen exactly once), with a fresh frame id:

        * a JSON-able value is encoded as the platform encodes JSON, non-ASCII as ``\\u``
          escapes, so a lone surrogate travels as one (an invalid UTF-16 escape on the wire);
        * a ``str`` stands where the encoded payload goes, as is (it need not be JSON);
        * ``bytes`` are carried as the platform carries bytes it cannot decode (DingTalk, whose
          frames are JSON text: as lone-surrogate escapes, Python's ``surrogateescape``).

        Returns True once the gateway positively acknowledged the frame (the platform will not
        deliver it again), False if no such ACK came within ``timeout`` seconds."""

    # -- raw frames ------------------------------------------------------------------------------
    #
    # Frames are handled as JSON-able dicts of their fields, so that one property-based test
    # mutates the frames of every platform alike (delete a field, replace it by junk or by a word
    # of the protocol, add one); the harness encodes whatever comes out as well as the wire can
    # carry it.

    @abc.abstractmethod
    def sample_frame(self, text: str, *, message_id: str, sender: str = "u1") -> dict[str, Any]:
        """A valid frame carrying a text message (the payload :meth:`sample_payload` gives, as
        the text the frame carries), as a dict of the frame's fields with the platform's names.
        Its frame id is fresh: pushed unchanged, it is answered like ``send`` and ACKed."""

    @abc.abstractmethod
    def frame_vocabulary(self) -> tuple[Any, ...]:
        """Values that mean something in this platform's frame fields (frame types, topics,
        methods, part counts, numbers at the edge of their type...): random junk rarely hits
        them, a mutation that puts one where another was tests the driver's logic."""

    def split_frame(self, frame: dict[str, Any], parts: int) -> list[dict[str, Any]] | None:
        """``frame`` (from :meth:`sample_frame`) as ``parts`` frames carrying one payload in
        parts, as the platform splits big payloads; None if the platform has no such thing."""
        return None

    @abc.abstractmethod
    async def push_frame(self, frame: Any, *, wait_connection: float = 5.0) -> FramePush:
        """Push ``frame`` once, as is (no redelivery; an ACK is not waited for, read it later from
        :attr:`FramePush.ack`), on a live connection (waiting up to ``wait_connection`` s):

        * a dict is encoded as the platform encodes frames, each field as well as the wire can
          carry its value (a value of the wrong type is junk of the wire's kind, not an error);
        * ``bytes`` and ``str`` are the whole frame, as far as the transport allows."""

    # -- exactly-once accounting -----------------------------------------------------------------

    @abc.abstractmethod
    def reply_record(self, message_id: str) -> ReplyRecord:
        """Every reply the platform shows for ``message_id`` now (see :class:`ReplyRecord`)."""


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
