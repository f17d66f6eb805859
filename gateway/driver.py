"""The Meta: the one interface every IM driver implements.

A driver is the *Type* of the element family: it knows one platform's protocol and nothing else.  The
core owns everything around it, which is why the interface is small:

* :meth:`Driver.serve` connects once and serves until that connection ends, then **raises**.  The
  supervisor (``gateway.supervisor``) owns the retry loop; a driver never loops or sleeps on its own.
* :meth:`Driver.open_reply` gives the core a :class:`ReplyChannel` for one message: show a placeholder,
  update it, finish it, fail it.  The core paces, splits and finalises; the channel only talks to the
  platform.
* :meth:`Driver.close` releases everything promptly.

The core hands each driver a :class:`DriverContext` through which it delivers messages (durably:
ACK the platform only after ``deliver`` returned) and reports its connection state.
"""

from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import Any, ClassVar, Protocol

import attrs

from gateway.models import FeedbackEvent, Incoming, Outgoing

__all__ = ["Capabilities", "Driver", "DriverContext", "MessageReplyChannel", "ReplyChannel"]


@attrs.frozen
class Capabilities:
    """What a platform can do; the core adapts its behaviour to it.

    edits:        a sent reply can be changed (placeholder, streamed updates).  Without it the core
                  sends one message per part when the answer is complete.
    streams:      the platform renders streamed text natively (AI cards); informational.
    feedback:     final replies can carry feedback buttons whose clicks come back as events.
    proactive:    the driver can send a message that answers nothing (outbound API).
    max_text_length: the most characters one reply may hold; longer answers are split.
    """

    edits: bool = True
    streams: bool = False
    feedback: bool = False
    proactive: bool = False
    max_text_length: int | None = None


class ReplyChannel(abc.ABC):
    """The reply to one incoming message, as the platform shows it.

    The core calls these methods one at a time, never concurrently, in this order:
    ``start`` (only when the driver can edit), any number of ``update``, then exactly one of ``finish``
    or ``fail``.  A long answer is continued in further channels from :meth:`follow_up`.

    ``update``/``finish`` get the *whole* text so far, not a delta.  Raise :class:`~gateway.errors.
    RetryableError` subclasses for transient platform failures (wrap the call with
    ``gateway.ratelimit.call_with_retry``); any exception is logged by the core, which goes on with the
    next state: a failed update is superseded by the next one, and the final state is always tried.

    Ids a platform lets the caller choose (card ids...) must be derived from ``message.reply_id`` (and
    the part index), so a message resumed after a crash updates the reply it already has.
    """

    @abc.abstractmethod
    async def start(self) -> None:
        """Show that an answer is coming (a "thinking…" placeholder)."""

    @abc.abstractmethod
    async def update(self, text: str) -> None:
        """Show ``text``, the answer so far."""

    @abc.abstractmethod
    async def finish(self, text: str, *, last: bool, feedback: bool) -> None:
        """Show the final ``text`` of this part.  ``last`` is False for the full parts of a long
        answer that continues in a follow-up; with ``feedback`` (only ever on the last part), attach
        the feedback actions."""

    @abc.abstractmethod
    async def fail(self, text: str, error: str) -> None:
        """End the reply as failed: ``text`` is what was answered so far (may be empty), ``error`` a
        readable explanation for the user ("the agent timed out", "interrupted")."""

    @abc.abstractmethod
    def follow_up(self, index: int) -> ReplyChannel:
        """A channel for part ``index`` (1, 2, ...) of a long answer, in the same conversation.

        The core finishes this channel (``last=False``) before using the follow-up, and never
        calls ``start`` on a follow-up."""


class MessageReplyChannel(ReplyChannel):
    """A reply as plain messages, one per part: nothing to show until a part is complete (no
    placeholder, no updates), then :meth:`send`.  For platforms (or modes) without edits."""

    async def start(self) -> None:
        return None

    async def update(self, text: str) -> None:
        return None

    async def finish(self, text: str, *, last: bool, feedback: bool) -> None:
        await self.send(text)

    @abc.abstractmethod
    async def send(self, text: str) -> None:
        """Send ``text`` as one message in the conversation replied to."""


class DriverContext(Protocol):
    """What the core offers a running driver.  Implemented by the core; drivers only call it."""

    instance: str
    logger: logging.LoggerAdapter[logging.Logger]
    state_dir: Path

    def connected(self) -> None:
        """Report that the session is established (the platform will now deliver)."""

    def frame_received(self) -> None:
        """Report any sign of life from the platform (health, zombie detection)."""

    def api_call(self, outcome: str) -> None:
        """Count one platform API call attempt by outcome (``ok``, ``retried``, ``rate_limited``,
        ``failed``) for the metrics: pass it as ``on_outcome`` to ``gateway.ratelimit.call_with_retry``."""

    async def deliver(self, message: Incoming) -> bool:
        """Record ``message`` durably and schedule its answer.

        Returns True for a new message and False for a duplicate (already answered or in progress);
        either way the driver ACKs it afterwards.  Cancelling the caller does not undo it: a
        message that reached the inbox is answered.  Raises :class:`~gateway.errors.ShuttingDown` while
        the gateway stops: then the driver must not ACK, so the platform delivers it again elsewhere.
        """
        ...

    async def feedback(self, event: FeedbackEvent) -> None:
        """Record a feedback click (one row per instance, reply and user; a later click replaces it)."""
        ...


class Driver(abc.ABC):
    """Base class of every IM driver plugin (entry-point group ``gateway.drivers``).

    Subclasses set the class attributes and implement :meth:`serve` and :meth:`open_reply`.  One driver
    object lives as long as its instance runs; ``serve`` is called again for every reconnection.
    """

    #: Human title and one-line description, shown by ``gateway plugins``.
    title: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: An attrs class: the schema of the instance file's ``[settings]`` table.  Field metadata
    #: ``help`` documents a field for ``gateway new``; fields typed ``Secret`` are credentials.
    settings_class: ClassVar[type[Any]]
    #: What the platform can do (a property in drivers whose capabilities depend on settings).
    capabilities: Capabilities = Capabilities()

    def __init__(self, settings: Any, context: DriverContext) -> None:
        self.settings = settings
        self.context = context

    @classmethod
    def exclusive_key(cls, settings: Any) -> str | None:
        """A key that no two enabled instances may share (e.g. the app's client id): two connections
        of one app steal each other's deliveries.  ``None`` (the default) means no such constraint."""
        return None

    @abc.abstractmethod
    async def serve(self) -> None:
        """Connect, call ``context.connected()``, and serve until the connection ends; then raise.

        Contract:
        * Never returns normally except after :meth:`close`; never retries or sleeps between attempts
          (the supervisor does, with backoff).
        * Raises :class:`~gateway.errors.ConnectionLost` when an established connection ends (server
          disconnect, no frame for too long), :class:`~gateway.errors.AuthenticationError` or
          :class:`~gateway.errors.DriverConfigError` when retrying soon cannot help, and any other
          exception (preferably a :class:`~gateway.errors.RetryableError`) for transient failures.
        * Hands each message to ``context.deliver`` and ACKs only after it returns: the ACK then means
          "stored", never "answered", so the platform never redelivers because an agent is slow.
        * Never blocks the event loop: blocking SDK calls go to threads or are replaced by async I/O.
        * Is cancellable at any await: cancellation closes what it opened.
        """

    @abc.abstractmethod
    def open_reply(self, message: Incoming) -> ReplyChannel:
        """The reply channel for ``message``, also for a message resumed after a restart (so it must
        work from the message alone, including ``message.raw``).  Must not do I/O itself."""

    async def prepare(self, message: Incoming) -> Incoming:
        """Make ``message`` ready for the agent, after it was acknowledged (never before: the ACK
        must not wait), e.g. turn attachment download codes into URLs.  The default returns it
        unchanged; an exception is logged and the message goes on as it was."""
        return message

    async def send(self, message: Outgoing) -> str:
        """Send a message that answers nothing (drivers whose ``capabilities.proactive`` is True).

        ``message.target`` says whether ``message.to`` is a conversation or a user.  Send
        ``message.text`` as markdown when ``message.markdown`` and the platform renders it, as plain
        text otherwise; text longer than ``capabilities.max_text_length`` arrives already split (one
        call per part).  Returns the platform's id of the sent message, or ``""``.  Works whether or
        not ``serve`` is currently connected, if the platform allows it.

        Raises :class:`~gateway.errors.SendRejected` when the platform refuses the recipient or the
        text, a :class:`~gateway.errors.RetryableError` for transient failures (after the driver's
        own rate-limited retries).  The core deduplicates on ``message.idempotency_key``.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot send proactive messages")

    async def close(self) -> None:
        """Stop serving and release connections; ``serve`` must end soon after.  Returns within a
        second; called once when the instance stops.  Replies already open may still be finished
        after ``close`` only if the platform allows it (HTTP APIs); the core finalises replies first."""
