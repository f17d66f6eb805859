"""The platform-neutral message model: what drivers hand the core and what the core hands back.

Every class is frozen and built through a named constructor (``Incoming.create``, a driver's own
``incoming_from_<platform>(payload)``, ``Incoming.from_record`` for the inbox), never ``Model(**raw)``
from a wire format.
"""

from __future__ import annotations

import enum
import functools
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

__all__ = [
    "Attachment",
    "ConversationKind",
    "FeedbackEvent",
    "Incoming",
    "Mention",
    "Outcome",
    "Outgoing",
    "Reply",
    "TargetKind",
]

# Reply ids are derived from (instance, message id) so that a message resumed after a crash updates the
# reply it already has instead of creating a second one.  The namespace is fixed forever for that reason.
_REPLY_NAMESPACE = uuid.UUID("5b0c2f4e-8a0e-4d51-9b43-6f1c1d7e2a10")


class ConversationKind(enum.StrEnum):
    SINGLE = "single"
    GROUP = "group"


@attrs.frozen
class Mention:
    user_id: str
    name: str = ""


@attrs.frozen
class Attachment:
    """A file, picture or other non-text part.  ``url`` may be a platform download code."""

    kind: str
    name: str = ""
    url: str = attrs.field(default="", repr=False)
    mime_type: str = ""


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean(value: Any) -> Any:
    """``value`` with every lone surrogate replaced by U+FFFD, in nested data and attrs objects too.

    A platform's JSON may carry one (``\\ud83d``: half of an emoji cut at a length limit, or
    hostile input).  It has no UTF-8 form, so the inbox could not store the message, the driver
    would not acknowledge it, and the platform would deliver it again forever."""
    # Exact types first: this walks every payload, and the ABC check of Mapping is slow.
    kind = type(value)
    if kind is str:
        # A lone surrogate is never ASCII, and isascii() is far cheaper than the regex.
        return value if value.isascii() else _LONE_SURROGATE.sub("\ufffd", value)
    if kind is dict:
        return {_clean(key): _clean(item) for key, item in value.items()}
    if kind is int or kind is float or kind is bool or value is None:
        return value
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, Mapping):
        return {_clean(key): _clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    if attrs.has(type(value)):
        fields = attrs.fields(type(value))
        return attrs.evolve(value, **{f.name: _clean(getattr(value, f.name)) for f in fields})
    return value


def _mentions(items: Iterable[Any]) -> tuple[Mention, ...]:
    return tuple(i if isinstance(i, Mention) else Mention(**i) for i in items)


def _attachments(items: Iterable[Any]) -> tuple[Attachment, ...]:
    return tuple(i if isinstance(i, Attachment) else Attachment(**i) for i in items)


@attrs.frozen
class Incoming:
    """One message received by one instance.

    ``message_id`` is the platform's id of the *message* (a redelivery carries the same one), which is
    what the inbox deduplicates on.  ``raw`` is the platform payload, kept for the driver; it is left out
    of ``repr`` because payloads carry reply URLs that work as credentials.
    """

    instance: str
    message_id: str
    conversation_id: str
    conversation_kind: ConversationKind = attrs.field(converter=ConversationKind)
    sender_id: str
    sender_name: str
    text: str
    mentions: tuple[Mention, ...] = attrs.field(converter=_mentions)
    attachments: tuple[Attachment, ...] = attrs.field(converter=_attachments)
    raw: Mapping[str, Any] = attrs.field(repr=False, eq=False, hash=False)
    received_at: float

    @classmethod
    def create(
        cls,
        *,
        instance: str,
        message_id: str,
        conversation_id: str,
        sender_id: str,
        text: str,
        conversation_kind: ConversationKind | str = ConversationKind.SINGLE,
        sender_name: str = "",
        mentions: Iterable[Mention] = (),
        attachments: Iterable[Attachment] = (),
        raw: Mapping[str, Any] | None = None,
        received_at: float | None = None,
    ) -> Incoming:
        """Build a message; ``received_at`` defaults to now (epoch seconds)."""
        if not message_id:
            raise ValueError("an incoming message needs the platform's message id")
        return cls(
            instance=instance,
            message_id=_clean(message_id),
            conversation_id=_clean(conversation_id),
            conversation_kind=ConversationKind(conversation_kind),
            sender_id=_clean(sender_id),
            sender_name=_clean(sender_name),
            text=_clean(text),
            mentions=_clean(list(mentions)),
            attachments=_clean(list(attachments)),
            raw=_clean(dict(raw or {})),
            received_at=time.time() if received_at is None else received_at,
        )

    @functools.cached_property
    def reply_id(self) -> str:
        """A stable id for this message's reply, the same after a restart."""
        return str(uuid.uuid5(_REPLY_NAMESPACE, f"{self.instance}\x00{self.message_id}"))

    def to_record(self) -> dict[str, Any]:
        """A JSON-able dict for the durable inbox (``json.dumps`` it; ``raw`` is not copied)."""
        # Not attrs.asdict: its deep copy of the raw payload cost more than storing the message.
        record = {f.name: getattr(self, f.name) for f in _INCOMING_FIELDS}
        record["conversation_kind"] = self.conversation_kind.value
        record["mentions"] = [_as_record(m) for m in self.mentions]
        record["attachments"] = [_as_record(a) for a in self.attachments]
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Incoming:
        """Rebuild a message stored by :meth:`to_record`."""
        return cls(**record)


_INCOMING_FIELDS = attrs.fields(Incoming)


def _as_record(value: Any) -> dict[str, Any]:
    return attrs.asdict(value, value_serializer=_serialize)


def _serialize(inst: Any, field: Any, value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    return value


class Outcome(enum.StrEnum):
    """How a reply ended."""

    ANSWERED = "answered"
    FAILED = "failed"  # the agent failed or timed out; the user saw an error text
    INTERRUPTED = "interrupted"  # cancelled (shutdown, /stop); the user saw what was there
    DENIED = "denied"  # access control refused it


@attrs.frozen
class Reply:
    """The final state of the reply to one message."""

    instance: str
    message_id: str
    reply_id: str
    text: str
    outcome: Outcome = attrs.field(converter=Outcome)

    @classmethod
    def for_message(cls, message: Incoming, text: str, outcome: Outcome) -> Reply:
        return cls(message.instance, message.message_id, message.reply_id, text, outcome)


@attrs.frozen
class FeedbackEvent:
    """A user's rating of a reply (a click on a feedback button).

    ``rating`` is the action's value as configured (e.g. ``"helpful"``); one row is kept per
    (instance, reply, user), so a second click replaces the first.
    """

    instance: str
    reply_id: str
    user_id: str
    rating: str
    message_id: str = ""
    comment: str = ""
    at: float = attrs.field(factory=time.time)

    @classmethod
    def create(
        cls,
        *,
        instance: str,
        reply_id: str,
        user_id: str,
        rating: str,
        message_id: str = "",
        comment: str = "",
    ) -> FeedbackEvent:
        if not rating:
            raise ValueError("feedback needs a rating")
        return cls(instance, reply_id, user_id, rating, message_id, comment)


class TargetKind(enum.StrEnum):
    """Whom a proactive message goes to."""

    CONVERSATION = "conversation"  # a group chat (DingTalk openConversationId, Feishu chat_id)
    USER = "user"  # one person, in the robot's one-to-one chat (DingTalk userId, Feishu open_id)


@attrs.frozen
class Outgoing:
    """A message that answers nothing, sent through an instance (the outbound API, ``gateway send``).

    ``idempotency_key`` is the caller's: the core sends a message with a key it has already sent only
    once.  Drivers may pass it to the platform where the platform deduplicates too.
    """

    instance: str
    target: TargetKind = attrs.field(converter=TargetKind)
    to: str
    text: str
    markdown: bool = False
    title: str = ""
    idempotency_key: str = ""

    @classmethod
    def create(
        cls,
        *,
        instance: str,
        to: str,
        text: str,
        target: TargetKind | str = TargetKind.CONVERSATION,
        markdown: bool = False,
        title: str = "",
        idempotency_key: str = "",
    ) -> Outgoing:
        if not to:
            raise ValueError("a proactive message needs a recipient")
        if not text.strip():
            raise ValueError("a proactive message needs text")
        return cls(instance, target, to, text, markdown, title, idempotency_key)

    @property
    def heading(self) -> str:
        """A short title for platforms that need one (DingTalk markdown, card headers)."""
        if self.title:
            return self.title
        first = self.text.strip().splitlines()[0].lstrip("#> ").strip()
        return first[:40] or "Message"
