"""The DingTalk platform harness: the plugin's emulator seen through the contract suite's eyes."""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from typing import Any

from gateway.models import Incoming
from gateway_dingtalk._payload import TOPIC_BOT, incoming_from_dingtalk
from gateway_dingtalk.emulator import DEFAULT_APP, DEFAULT_SECRET, DingTalkEmulator, EmulatorError
from gateway_dingtalk.emulator._faults import push_raw_frame
from gateway_dingtalk.emulator._payloads import CARD_TOPIC, new_msg_id
from gateway_testkit.harness import (
    ApiFault,
    FaultInjection,
    FramePush,
    ReplyRecord,
    ReplyView,
    pushed_again_if_cut,
)

__all__ = ["TEMPLATE", "TEMPLATE_VARIABLES", "DingTalkHarness", "dingtalk_settings", "reply_id_for"]

TEMPLATE = "imgateway.test.schema"
#: the variables the driver's default settings use
TEMPLATE_VARIABLES = ("content", "feedback", "rating", "label1", "label2", "label3", "label4")


def dingtalk_settings(
    emulator: DingTalkEmulator,
    *,
    client_id: str = DEFAULT_APP,
    client_secret: str = DEFAULT_SECRET,
    **overrides: Any,
) -> dict[str, Any]:
    """A ``[settings]`` table for a ``dingtalk-stream`` instance talking to ``emulator``: the test
    template, no pacing between card calls, a generous rate; ``overrides`` win."""
    return {
        "client_id": client_id,
        "client_secret": client_secret,
        "endpoint": emulator.url,
        "card_template_id": TEMPLATE,
        "card_update_interval": 0.0,
        "rate": 1000.0,
        "frame_timeout": 10.0,
        **overrides,
    }


def reply_id_for(message_id: str, instance: str = "bot") -> str:
    """The reply id (the first card's ``outTrackId``) the core derives for ``message_id``."""
    return Incoming.create(
        instance=instance, message_id=message_id, conversation_id="-", sender_id="-", text=""
    ).reply_id


_STATES = {
    "processing": "thinking",
    "streaming": "streaming",
    "finished": "final",
    "failed": "failed",
}


def _showed_feedback(card: Any) -> bool:
    """The card's feedback buttons were switched on (they stay on record after a click)."""
    return any(update.changes.get("feedback") == "1" for update in card.history)


#: the reply API: AI cards (create, deliver, update, streaming); tokens and connections excluded
_CARD_API = "/v1.0/card"
#: how DingTalk answers each fault (status, code); 400 InvalidAuthentication is its expired token
_API_FAULTS: dict[ApiFault, tuple[int, str | None]] = {
    "token_expired": (400, "InvalidAuthentication"),
    "rate_limited": (403, None),  # the emulator's default 403 is the QpsLimit answer
    "server_error": (500, None),
}
#: seconds the emulator waits after SYSTEM/disconnect before closing a connection itself
_DISCONNECT_GRACE = 5.0


def _connection_went_away(error: Exception) -> bool:
    """The emulator's push failed because the connection it chose died under it."""
    return isinstance(error, EmulatorError) and "went away" in str(error)


class DingTalkHarness(FaultInjection):
    driver_type = "dingtalk-stream"
    max_text_length = 150

    def __init__(self, **emulator_options: Any) -> None:
        options = {"templates": {TEMPLATE: TEMPLATE_VARIABLES}, **emulator_options}
        self.emulator = DingTalkEmulator(**options)
        # Frame ids ``sample_frame`` gave out and no push has used yet.
        self._fresh_frames: set[str] = set()

    async def start(self) -> None:
        await self.emulator.start()

    async def close(self) -> None:
        await self.emulator.close()

    def settings(self) -> dict[str, Any]:
        return {
            "client_id": DEFAULT_APP,
            "client_secret": DEFAULT_SECRET,
            "endpoint": self.emulator.url,
            "card_template_id": TEMPLATE,
            "card_update_interval": 0.0,
            "card_max_length": self.max_text_length,
            "message_max_length": self.max_text_length,
            "rate": 1000.0,
            "frame_timeout": 10.0,
        }

    async def send(
        self, text: str, *, sender: str = "u1", conversation: str = "c1", message_id: str = ""
    ) -> str:
        message_id = message_id or new_msg_id()
        await pushed_again_if_cut(
            lambda: self.emulator.send_message(
                text=text, sender_staff_id=sender, msg_id=message_id
            ),
            _connection_went_away,
        )
        await self.emulator.wait_acked(message_id, timeout=10)
        return message_id

    async def redeliver(self, message_id: str) -> None:
        push = await self.emulator.redeliver(message_id)
        await self.emulator.wait_acked(push.frame_id, timeout=10)

    def _cards(self, message_id: str) -> list[Any]:
        reply_id = self.reply_id(message_id)
        cards = []
        while card := self.emulator.cards.get(
            reply_id if not cards else f"{reply_id}.{len(cards)}"
        ):
            cards.append(card)
        return cards

    async def reply(self, message_id: str) -> ReplyView:
        cards = self._cards(message_id)
        if not cards:
            messages = self.emulator.replies(message_id)
            if not messages:
                return ReplyView("none", "", 0, 0)
            text = "".join(m.text for m in messages)
            return ReplyView("final", text, len(messages), 0)
        last = cards[-1]
        text = "".join(card.content.get("content", "") for card in cards)
        updates = sum(card.streaming_calls for card in cards) - sum(card.ended for card in cards)
        state = _STATES[last.status]
        if state == "final" and not _showed_feedback(last):
            # Every part but the last is finished without feedback buttons, and the next part's
            # card may not exist yet: the reply is final once its last card shows the buttons.
            state = "streaming"
        return ReplyView(state, text, len(cards), updates, text if state == "failed" else "")

    async def click_feedback(self, message_id: str, user: str, rating: str) -> None:
        last = self._cards(message_id)[-1]
        response = await self.emulator.click_card(
            None, last.out_track_id, user, params={"rating": rating}
        )
        if response is None:
            raise AssertionError("the driver did not acknowledge the card click in time")

    def leftover(self, message_id: str, text: str) -> Incoming:
        data = self.emulator.message(text=text, msg_id=message_id)
        return incoming_from_dingtalk(self.instance, data, frame_id="lost-frame")

    # -- FaultInjection ------------------------------------------------------------------------

    def connections(self) -> int:
        return sum(1 for conn in self.emulator.connections if not conn.draining)

    async def drop_connections(self) -> int:
        return await self.emulator.drop_connections()

    async def server_disconnect(self) -> int:
        ids = await self.emulator.send_disconnect(close_after=_DISCONNECT_GRACE)
        return len(ids)

    def refuse_connections(self, refuse: bool) -> None:
        self.emulator.refuse_connections = refuse

    async def restart(self) -> None:
        await self.emulator.close()
        await self.emulator.start()  # the port it got the first time

    def redeliver_unacked_after(self, seconds: float) -> None:
        self.emulator.ack_timeout = seconds
        # DingTalk's own schedule gives up after a few tries; the contract asks for "until ACKed",
        # and a large count keeps every redelivery loop bounded by the test's lifetime anyway.
        self.emulator.max_redeliveries = 1_000_000

    def fail_next_api_calls(self, count: int, fault: ApiFault) -> None:
        status, code = _API_FAULTS[fault]
        self.emulator.fail_next(_CARD_API, count=count, status=status, code=code)

    def set_api_latency(self, seconds: float) -> None:
        self.emulator.latency = seconds

    def set_rate_limit(self, per_second: float | None) -> None:
        self.emulator.qps_limit = per_second

    def rate_limit_rejections(self) -> int:
        return sum(self.emulator.rejections.values())

    def expire_tokens(self) -> None:
        self.emulator.expire_tokens()  # the next call with an old token: 400 InvalidAuthentication

    def sample_payload(
        self, text: str, *, message_id: str, sender: str = "u1", conversation: str = "c1"
    ) -> Any:
        # DingTalk's 1:1 chat of ``sender`` (as ``send`` uses): the conversation id is DingTalk's.
        return self.emulator.message(text=text, msg_id=message_id, sender_staff_id=sender)

    async def push_raw(self, payload: Any, *, timeout: float = 5.0) -> bool:
        if isinstance(payload, bytes):
            data = payload.decode("utf-8", errors="surrogateescape")
        elif isinstance(payload, str):
            data = payload
        else:
            data = json.dumps(payload)  # ASCII escapes, as the contract asks
        frame_id = f"raw-{uuid.uuid4().hex}"
        frame = {
            "specVersion": "1.0",
            "type": "CALLBACK",
            "headers": {
                "contentType": "application/json",
                "messageId": frame_id,
                "time": str(int(time.time() * 1000)),
                "topic": TOPIC_BOT,
            },
            "data": data,
        }
        await self.emulator.wait_connected(timeout=timeout)
        await self.emulator.push_frame(None, frame)
        with contextlib.suppress(TimeoutError):
            ack = await self.emulator.wait_acked(frame_id, timeout=timeout)
            return bool(ack.code == 200)
        return False

    def sample_frame(self, text: str, *, message_id: str, sender: str = "u1") -> dict[str, Any]:
        frame_id = f"raw-{uuid.uuid4().hex}"
        self._fresh_frames.add(frame_id)
        payload = self.sample_payload(text, message_id=message_id, sender=sender)
        # As the Stream gateway frames a robot message (appId and connectionId, which name the
        # connection, left out: the connection is chosen when pushing).
        return {
            "specVersion": "1.0",
            "type": "CALLBACK",
            "headers": {
                "contentType": "application/json",
                "messageId": frame_id,
                "time": str(int(time.time() * 1000)),
                "topic": TOPIC_BOT,
            },
            "data": json.dumps(payload),
        }

    def frame_vocabulary(self) -> tuple[Any, ...]:
        return (
            *("CALLBACK", "EVENT", "SYSTEM", TOPIC_BOT, CARD_TOPIC, "ping", "disconnect", "*"),
            *("1.0", "application/json", "text/plain", "", "0", "-1", "1e400", "9" * 40),
            *(str(2**63), 2**63, -1, 0.5, math.inf, -math.inf, math.nan),
            *("{}", "[]", "null", '{"opaque": 1}', '{"reason": 7}'),
        )

    async def push_frame(self, frame: Any, *, wait_connection: float = 5.0) -> FramePush:
        headers = frame.get("headers") if isinstance(frame, dict) else None
        frame_id = headers.get("messageId") if isinstance(headers, dict) else None
        fresh = isinstance(frame_id, str) and frame_id in self._fresh_frames
        if isinstance(frame, bytes | str):
            # A websocket text message is UTF-8: what is not becomes U+FFFD (or "?").
            raw = frame if isinstance(frame, bytes) else frame.encode("utf-8", "replace")
            text = raw.decode("utf-8", errors="replace")
        else:
            text = json.dumps(frame)  # ASCII escapes: lone surrogates travel as \ud83d
        await self.emulator.wait_connected(timeout=wait_connection)
        if fresh:
            self._fresh_frames.discard(frame_id)
        try:
            record = await push_raw_frame(self.emulator, text, frame_id=frame_id if fresh else None)
        except EmulatorError as exc:
            if not _connection_went_away(exc):
                raise
            # The client closed the connection while reading it (a frame beyond its size limit).
            return FramePush(None, None, f"{_shorten(text)} (the connection ended meanwhile)")
        # A frame with the id the harness gave it and a type (any: the protocol answers unknown
        # ones with 404) must be ACKed; one whose id is junk cannot be matched to its ACK, one
        # without an object of headers cannot be ACKed at all.
        typed = isinstance(frame, dict) and isinstance(frame.get("type"), str)
        expects = (True if typed else None) if fresh else None if frame_id else False
        return FramePush(expects, record, _shorten(text))

    def reply_record(self, message_id: str) -> ReplyRecord:
        reply_id = self.reply_id(message_id)
        cards = [
            card
            for track, card in self.emulator.cards.items()
            if track == reply_id or track.startswith(f"{reply_id}.")
        ]
        # Markdown replies through the message's session webhook; proactive OpenAPI messages
        # name no message, so a duplicate sent that way would escape this count.
        messages = self.emulator.replies(message_id)
        unfinished = sum(1 for card in cards if not card.ended)
        return ReplyRecord(replies=len(cards) + len(messages), unfinished=unfinished)


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
