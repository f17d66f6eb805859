"""What the emulator records: plain attrs classes a test (or a platform harness) reads back.

Timestamps named ``time`` are ``time.monotonic()`` seconds (compare them with each other, not with
the wall clock); the epoch milliseconds DingTalk puts in payloads live in the payloads themselves.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

__all__ = [
    "AckRecord",
    "CallRecord",
    "CardClick",
    "CardState",
    "CardUpdate",
    "ConcurrentCardUpdate",
    "Conversation",
    "Distribution",
    "EmulatorError",
    "PingRecord",
    "SentMessage",
    "SentReply",
    "StreamConnection",
    "Subscription",
    "Violation",
]

#: How pushes are spread over several live connections of one app (see the research doc §1.8).
Distribution = Literal["random", "newest", "reject"]

#: AI card states as the emulator tracks them (``flowStatus`` in the card data is separate).
CardStatus = Literal["processing", "streaming", "finished", "failed", "sent"]


class EmulatorError(Exception):
    """The test asked the emulator for something the platform could not do (e.g. push a topic
    nobody subscribed to, or push while no client is connected)."""


@attrs.frozen
class Subscription:
    type: str  # "EVENT" | "CALLBACK" | "SYSTEM"
    topic: str


@attrs.define(eq=False)
class StreamConnection:
    """One websocket of the Stream gateway.  ``id`` is the ticket it was opened with (as on the real
    gateway, where ``headers.connectionId`` equals the ticket)."""

    id: str
    app: str
    subscriptions: tuple[Subscription, ...]
    opened_at: float
    ua: str = ""
    local_ip: str = ""
    #: a SYSTEM/disconnect was sent: no new pushes are routed here
    draining: bool = False
    closed_at: float | None = None
    close_code: int | None = None
    #: how the connection ended: "client" (client closed), "server" (emulator closed with a frame),
    #: "dropped" (TCP aborted), "disconnect-timeout" (closed 10 s after SYSTEM/disconnect),
    #: "replaced" (distribution "newest")
    closed_by: str = ""

    @property
    def live(self) -> bool:
        return self.closed_at is None

    def subscribed(self, frame_type: str, topic: str) -> bool:
        if frame_type == "SYSTEM":
            return True
        if frame_type == "EVENT":
            return any(s.type == "EVENT" for s in self.subscriptions)
        return Subscription(frame_type, topic) in self.subscriptions


@attrs.frozen
class SentMessage:
    """A robot message (or event) the emulator pushed.  ``frame_id`` is the ``headers.messageId``
    of the first push; ``delivered`` is False when DingTalk would not have delivered it at all
    (e.g. a group message that does not @ the bot)."""

    msg_id: str
    frame_id: str
    connection_id: str
    data: dict[str, Any]
    delivered: bool = True


@attrs.frozen
class AckRecord:
    """An ack frame a client sent.  ``msg_id`` is the logical id of what was acked (``data.msgId``
    of a robot message, ``eventId`` of an event, the ``outTrackId`` of a card click, the frame id
    of a SYSTEM frame); ``data`` is the parsed ``data`` string (or the raw value if it was not a
    JSON string)."""

    frame_id: str
    msg_id: str
    connection_id: str
    topic: str
    frame_type: str
    code: Any
    message: Any
    data: Any
    raw: dict[str, Any]
    time: float
    #: seconds since the acked frame was pushed
    latency: float


@attrs.frozen
class PingRecord:
    connection_id: str
    frame_id: str
    opaque: str
    sent_at: float
    acked_at: float | None = None
    echoed: Any = None

    @property
    def ok(self) -> bool:
        return self.acked_at is not None and self.echoed == self.opaque


@attrs.frozen
class Violation:
    """Something a client did that the real platform would not accept or that betrays a driver bug.

    ``kind`` is one of: ``misrouted_ack``, ``unknown_ack``, ``duplicate_ack``, ``opaque_mismatch``,
    ``bad_frame``, ``binary_frame``, ``ack_data_not_string``, ``late_card_ack``,
    ``bad_card_response``, ``stream_after_end``, ``concurrent_card_update``."""

    kind: str
    detail: str
    connection_id: str | None
    time: float


@attrs.frozen
class CardUpdate:
    """One change to a card.  ``source`` is ``create``, ``deliver``, ``update``, ``streaming``,
    ``callback`` (applied from a card-click ack) or ``legacy``."""

    source: str
    time: float
    changes: dict[str, Any]
    replace: bool = False
    key: str | None = None
    guid: str | None = None
    is_finalize: bool = False
    is_error: bool = False
    status: str = ""


@attrs.define(eq=False)
class CardState:
    """A card as DingTalk keeps it."""

    out_track_id: str
    template_id: str
    app: str
    robot_code: str
    callback_type: str | None
    created_at: float
    param_map: dict[str, Any] = attrs.field(factory=dict)
    #: userId -> that user's private cardParamMap
    private_data: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    #: streamed content by key (AI card ``PUT /v1.0/card/streaming``)
    content: dict[str, str] = attrs.field(factory=dict)
    #: openSpaceIds the card was delivered to
    spaces: list[str] = attrs.field(factory=list)
    status: CardStatus = "processing"
    history: list[CardUpdate] = attrs.field(factory=list)
    #: a legacy "StandardCard" sent by ``/v1.0/im/v1.0/robot/interactiveCards/send``
    legacy: bool = False
    guids: set[str] = attrs.field(factory=set, repr=False)

    @property
    def space(self) -> str | None:
        return self.spaces[0] if self.spaces else None

    @property
    def flow_status(self) -> Any:
        """The SDK-style AI card status param (``"1"`` processing ... ``"3"`` finished, ``"5"``
        failed), if the driver uses one."""
        return self.param_map.get("flowStatus")

    @property
    def streaming_calls(self) -> int:
        return sum(1 for update in self.history if update.source == "streaming")

    @property
    def ended(self) -> bool:
        return self.status in ("finished", "failed")


@attrs.frozen
class CardClick:
    """A card action callback the emulator pushed, and what came back."""

    out_track_id: str
    user_id: str
    params: dict[str, Any]
    action_ids: list[str]
    frame_id: str
    connection_id: str
    sent_at: float
    acked_at: float | None
    #: the ack arrived within DingTalk's 2 s limit
    within_limit: bool
    response: Any
    applied: bool


@attrs.frozen
class ConcurrentCardUpdate:
    out_track_id: str
    path: str
    #: paths of the requests for the same card already in flight
    in_flight: tuple[str, ...]
    time: float
    rejected: bool


@attrs.frozen
class SentReply:
    """A message the bot sent: through a session webhook (``via="session"``), to a group
    (``via="group"``) or 1:1 in batch (``via="otm"``, one record per recipient)."""

    via: str
    app: str | None
    conversation_id: str | None
    conversation_type: str | None
    #: session: the user whose message issued the webhook; otm: the recipient
    user_id: str | None
    #: text, markdown, actionCard... (the webhook msgtype, or derived from a proactive msgKey)
    msgtype: str
    text: str
    title: str
    at: Any
    body: dict[str, Any]
    time: float
    #: session: the msgId of the message whose sessionWebhook was used
    in_reply_to: str | None = None
    msg_key: str | None = None


@attrs.frozen
class CallRecord:
    """One HTTP request to the emulator (OpenAPI, connections/open, session webhook, files)."""

    method: str
    path: str
    status: int
    code: str
    app: str | None
    time: float
    body: Any = None
    response: Any = None


@attrs.define(eq=False)
class Conversation:
    id: str
    app: str
    type: str  # "1" | "2"
    title: str = ""
    members: set[str] = attrs.field(factory=set)
