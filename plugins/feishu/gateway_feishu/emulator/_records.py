"""What the emulator records: attrs classes a test (or a platform harness) reads back.

Timestamps named ``time``/``*_at`` are ``time.monotonic()`` seconds (compare them with each other,
not with the wall clock); the epoch milliseconds Feishu puts in payloads live in the payloads.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from gateway.errors import GatewayError

__all__ = [
    "AckRecord",
    "CallRecord",
    "CardClick",
    "CardState",
    "CardUpdate",
    "Chat",
    "Delivery",
    "EmulatorError",
    "PingRecord",
    "Rejection",
    "SentMessage",
    "Violation",
    "WsConnection",
]


class EmulatorError(GatewayError):
    """The test asked the emulator for something Feishu could not do (push while no client is
    connected, click a card that does not exist...)."""


@attrs.define(eq=False)
class WsConnection:
    """One long-connection websocket.  ``id`` is its ``device_id`` (the conn_id lark-oapi logs)."""

    id: str
    app: str
    service_id: int
    opened_at: float
    closed_at: float | None = None
    #: "client" (client closed), "server" (emulator closed politely), "dropped" (TCP aborted)
    closed_by: str = ""

    @property
    def live(self) -> bool:
        return self.closed_at is None


@attrs.define(eq=False)
class Chat:
    """A chat the bot is in: ``p2p`` (one user) or ``group``."""

    id: str
    app: str
    chat_type: str
    name: str
    members: set[str] = attrs.field(factory=set)


@attrs.frozen
class Delivery:
    """An event the emulator pushed (or, with ``delivered=False``, would not push: a group message
    that does not @ the bot).  ``message_id`` is the IM message id for ``im.message.receive_v1``."""

    event_id: str
    payload: Any
    app: str
    message_id: str | None = None
    chat_id: str | None = None
    root_id: str | None = None
    delivered: bool = True
    #: the ``message_id`` header of the first frame (every re-push gets a new one)
    frame_id: str | None = None
    connection_id: str | None = None


@attrs.frozen
class AckRecord:
    """A DATA frame a client wrote back.  ``code`` is the payload's ``code`` (200 = handled) and
    ``response`` the decoded ``data`` (base64 JSON: a card callback's toast/card), if any."""

    frame_id: str
    event_id: str | None
    connection_id: str
    code: Any
    response: Any
    biz_rt: str | None
    payload: bytes
    time: float
    #: seconds since the acked frame was pushed
    latency: float

    @property
    def ok(self) -> bool:
        return self.code == 200


@attrs.frozen
class PingRecord:
    connection_id: str
    time: float
    #: a pong was sent back (False while ``stop_pongs`` is set)
    answered: bool


@attrs.frozen
class Violation:
    """Something a client did that Feishu would not accept or that betrays a driver bug.

    ``kind`` is one of ``unknown_ack`` (ACK for a frame never pushed on that connection),
    ``duplicate_ack``, ``bad_frame`` (undecodable bytes), ``text_frame``, ``bad_ack_payload``,
    ``unexpected_frame`` (a client sent a pong, or a DATA frame that is not an ACK),
    ``sequence_not_increasing``, ``update_after_close``, ``settings_without_config``."""

    kind: str
    detail: str
    connection_id: str | None
    time: float


@attrs.frozen
class CallRecord:
    """One HTTP request: ``code`` is Feishu's business code (0 = success)."""

    method: str
    path: str
    status: int
    code: int
    app: str | None
    time: float
    body: Any = None
    response: Any = None


@attrs.frozen
class Rejection:
    """A request refused by a rate limit: which limit (``card``, ``app``, ``chat``, ``message``)."""

    limit: str
    path: str
    key: str
    time: float
    epoch_second: int


@attrs.frozen
class SentMessage:
    """A message the bot sent (create or reply)."""

    message_id: str
    app: str
    chat_id: str
    msg_type: str
    #: the ``content`` JSON string as sent (for interactive cards: the latest one, after PATCHes)
    content: str
    time: float
    receive_id: str | None = None
    receive_id_type: str | None = None
    #: the user message this replies to (``/reply``), else None
    reply_to: str | None = None
    root_id: str | None = None
    uuid: str | None = None
    reply_in_thread: bool = False
    #: the CardKit card sent by reference (``{"type":"card","data":{"card_id":...}}``)
    card_id: str | None = None

    @property
    def text(self) -> str:
        """The text of a ``text`` message ('' for other types)."""
        if self.msg_type != "text":
            return ""
        try:
            body = json.loads(self.content)
        except ValueError:
            return ""
        text = body.get("text") if isinstance(body, dict) else None
        return text if isinstance(text, str) else ""


@attrs.frozen
class CardUpdate:
    """One accepted CardKit operation on a card: ``kind`` is ``create``, ``content`` (element
    text), ``settings`` or ``update`` (full JSON)."""

    kind: str
    time: float
    sequence: int | None = None
    element_id: str | None = None
    content: str | None = None
    uuid: str | None = None
    #: content updates: the previous text was a prefix of this one (Feishu's typewriter effect)
    appended: bool = True


@attrs.define(eq=False)
class CardState:
    """A CardKit card entity as Feishu keeps it."""

    card_id: str
    app: str
    created_at: float
    data: dict[str, Any]
    #: element_id -> current text of markdown/plain_text elements
    contents: dict[str, str] = attrs.field(factory=dict)
    sequence: int = 0
    history: list[CardUpdate] = attrs.field(factory=list)
    #: IM messages that carry this card (sent by reference)
    message_ids: list[str] = attrs.field(factory=list)
    #: streaming was switched off after having been on (a finished stream)
    closed: bool = False
    streaming_started_at: float | None = None
    #: when Feishu's streaming timeout switched streaming off (None: it never did)
    timed_out_at: float | None = None
    #: the timeout struck and no element content call has heard 200850 about it yet
    timeout_unreported: bool = False
    uuids: dict[str, str] = attrs.field(factory=dict, repr=False)

    @property
    def streaming_mode(self) -> bool:
        config = self.data.get("config")
        return isinstance(config, dict) and config.get("streaming_mode") is True

    @property
    def content_updates(self) -> int:
        return sum(1 for update in self.history if update.kind == "content")

    @property
    def finished(self) -> bool:
        """The card is final: streaming was on and the client switched it off (settings or a
        full update; Feishu's streaming timeout alone does not finish a card)."""
        return self.closed and not self.streaming_mode

    @property
    def text(self) -> str:
        """Every element text, in card order, joined by newlines."""
        return "\n".join(self.contents[key] for key in self.contents if self.contents[key])

    @property
    def buttons(self) -> list[dict[str, Any]]:
        """The ``button`` elements of the current card JSON (anywhere in ``body``)."""
        found: list[dict[str, Any]] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                if node.get("tag") == "button":
                    found.append(node)
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(self.data.get("body"))
        return found

    @property
    def shows_buttons(self) -> bool:
        return bool(self.buttons)


@attrs.frozen
class CardClick:
    """A ``card.action.trigger`` callback the emulator pushed, and what came back."""

    event_id: str
    message_id: str | None
    card_id: str | None
    user_open_id: str
    value: Any
    frame_id: str
    connection_id: str
    sent_at: float
    acked_at: float | None
    response: Any
