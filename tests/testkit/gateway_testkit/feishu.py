"""The Feishu platform harness: the plugin's emulator seen through the contract suite's eyes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import struct
import zlib
from typing import Any

from gateway.models import Incoming
from gateway_feishu._frames import DATA, Frame
from gateway_feishu._payload import incoming_from_feishu
from gateway_feishu.emulator import (
    DEFAULT_APP,
    DEFAULT_SECRET,
    CardState,
    Delivery,
    EmulatorError,
    FeishuEmulator,
    SentMessage,
)
from gateway_feishu.emulator._faults import push_raw_frame
from gateway_feishu.emulator._payloads import new_event_id, new_message_id
from gateway_testkit.harness import (
    ApiFault,
    FaultInjection,
    FramePush,
    ReplyRecord,
    ReplyView,
    pushed_again_if_cut,
)

__all__ = ["ERROR_MARK", "FeishuHarness", "feishu_settings", "message_text"]

#: how the driver (default ``error_prefix``) marks the error of a failed answer, after the text
#: answered so far (or alone, without the quote, when there was none)
ERROR_MARK = "\n\n> ⚠️ "
_ERROR_ALONE = "⚠️ "
#: the reply API whose calls ``fail_next_api_calls`` fails: CardKit (create, stream, finish)
_CARD_API = "/open-apis/cardkit/"
#: the emulator's ``fail_next`` status for each fault (it answers 400 with 99991663, 429 with
#: 99991400, 500 with an internal error)
_API_FAULTS: dict[ApiFault, int] = {"token_expired": 400, "rate_limited": 429, "server_error": 500}


def feishu_settings(
    emulator: FeishuEmulator,
    *,
    app_id: str = DEFAULT_APP,
    app_secret: str = DEFAULT_SECRET,
    **overrides: Any,
) -> dict[str, Any]:
    """A ``[settings]`` table for a ``feishu`` instance talking to ``emulator``: card calls paced
    just under CardKit's 10/s per card, a generous app rate; ``overrides`` win."""
    return {
        "app_id": app_id,
        "app_secret": app_secret,
        "domain": emulator.url,
        "card_update_interval": 0.11,
        "rate": 1000.0,
        "frame_timeout": 10.0,
        **overrides,
    }


def message_text(message: SentMessage) -> str:
    """What a text or post (``md`` elements) message shows."""
    if message.msg_type == "text":
        return message.text
    body = json.loads(message.content)
    post = next(iter(body.values())) if isinstance(body, dict) and body else {}
    return "\n".join(str(item.get("text", "")) for line in post.get("content", []) for item in line)


def card_answer(card: CardState) -> str:
    return card.contents.get("answer", "")


def failure(shown: str) -> tuple[str, str] | None:
    """``(text answered so far, error)`` of a failed answer's text, None for any other text."""
    if shown.startswith(_ERROR_ALONE):
        return "", shown.removeprefix(_ERROR_ALONE)
    answer, mark, error = shown.rpartition(ERROR_MARK)
    return (answer, error) if mark else None


def _connection_went_away(error: Exception) -> bool:
    """The emulator's push failed because the connection it chose died under it."""
    return isinstance(error, EmulatorError) and "went away" in str(error)


class FeishuHarness(FaultInjection):
    driver_type = "feishu"
    max_text_length = 150

    def __init__(self, **emulator_options: Any) -> None:
        self.emulator = FeishuEmulator(**emulator_options)
        # The contract suite names messages; redelivering one needs its event.
        self._events: dict[str, str] = {}
        # Frame ids (``message_id`` headers) ``sample_frame`` gave out and no push has used yet.
        self._fresh_frames: set[str] = set()

    async def start(self) -> None:
        await self.emulator.start()

    async def close(self) -> None:
        await self.emulator.close()

    def settings(self) -> dict[str, Any]:
        return feishu_settings(self.emulator, max_text_length=self.max_text_length)

    async def send(
        self, text: str, *, sender: str = "u1", conversation: str = "c1", message_id: str = ""
    ) -> str:
        # Fixed ids, so a push cut by a dropped socket is pushed again as the same event (the
        # emulator knows the event from the first try on, so that is a redelivery).
        message_id = message_id or new_message_id()
        event_id = new_event_id()
        tried = False

        async def push() -> None:
            nonlocal tried
            if tried and self.emulator.knows_event(event_id):
                await self.emulator.redeliver(event_id)
                return
            tried = True
            await self.emulator.send_message(
                text, sender=sender, message_id=message_id, event_id=event_id
            )

        await pushed_again_if_cut(push, _connection_went_away)
        self._events[message_id] = event_id
        await self.emulator.wait_acked(event_id, timeout=10)
        return message_id

    async def redeliver(self, message_id: str) -> None:
        frame_id = await self.emulator.redeliver(self._events[message_id])
        async with asyncio.timeout(10):
            while not any(ack.frame_id == frame_id and ack.ok for ack in self.emulator.acks):
                await asyncio.sleep(0.01)

    async def reply(self, message_id: str) -> ReplyView:
        replies = self.emulator.replies(message_id)
        if not replies:
            return ReplyView("none", "", 0, 0)
        cards = [self.emulator.cards[m.card_id] for m in replies if m.card_id is not None]
        if not cards:
            return ReplyView("final", "".join(message_text(m) for m in replies), len(replies), 0)
        text = "".join(card_answer(card) for card in cards)
        updates = sum(card.content_updates for card in cards) - sum(c.finished for c in cards)
        last = cards[-1]
        failed = failure(card_answer(last))
        if last.finished and failed is not None:
            text = "".join(card_answer(card) for card in cards[:-1]) + failed[0]
            return ReplyView("failed", text, len(cards), updates, failed[1])
        if last.finished and last.shows_buttons:
            state = "final"  # every part but the last is finished without buttons
        elif last.content_updates == 0:
            state = "thinking"
        else:
            state = "streaming"
        return ReplyView(state, text, len(cards), updates)

    def user_id(self, user: str) -> str:
        return self.emulator.user(user).open_id

    async def click_feedback(self, message_id: str, user: str, rating: str) -> None:
        replies = self.emulator.replies(message_id)
        card = self.emulator.cards[replies[-1].card_id or ""]
        values = [b["behaviors"][0]["value"] for b in card.buttons]
        [value] = [v for v in values if v.get("rating") == rating]
        response = await self.emulator.click_card(card.card_id, user, value)
        if response is None:
            raise AssertionError("the driver did not acknowledge the card click in time")

    def leftover(self, message_id: str, text: str) -> Incoming:
        # The message reached Feishu (and the gateway) before the crash: the emulator knows it.
        payload = self._known(self.emulator.message(text, message_id=message_id))
        return incoming_from_feishu(self.instance, payload, self.emulator.bot().open_id)

    def _known(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Register the user message ``payload`` carries, as if it had been pushed, so a reply to
        it is accepted (pushing raw bytes registers nothing)."""
        message = payload["event"]["message"]
        self.emulator.received[message["message_id"]] = Delivery(
            payload["header"]["event_id"],
            payload,
            self.emulator.default_app,
            message_id=message["message_id"],
            chat_id=message["chat_id"],
        )
        return payload

    # -- FaultInjection ------------------------------------------------------------------------

    def connections(self) -> int:
        return len(self.emulator.live_connections)

    async def drop_connections(self) -> int:
        return await self.emulator.drop_connections()

    async def server_disconnect(self) -> int:
        # The long connection has no goodbye message: the server closes the websocket.
        return await self.emulator.server_close(code=1001, message="server going away")

    def refuse_connections(self, refuse: bool) -> None:
        self.emulator.refuse_connections = refuse  # the endpoint answers code 1, "system busy"

    async def restart(self) -> None:
        await self.emulator.close()
        await self.emulator.start()  # the port it got the first time

    def redeliver_unacked_after(self, seconds: float) -> None:
        self.emulator.ack_timeout = seconds
        # Feishu's schedule gives up after a few tries; the contract asks for "until ACKed", and a
        # large count keeps every re-push loop bounded by the test's lifetime anyway.
        self.emulator.max_redeliveries = 1_000_000

    def fail_next_api_calls(self, count: int, fault: ApiFault) -> None:
        self.emulator.fail_next(_CARD_API, count=count, http_status=_API_FAULTS[fault])

    def set_api_latency(self, seconds: float) -> None:
        self.emulator.latency = seconds

    def set_rate_limit(self, per_second: float | None) -> None:
        self.emulator.app_rate_limit = per_second  # per app and API, as Feishu counts

    def rate_limit_rejections(self) -> int:
        return sum(self.emulator.rejections.values())

    def expire_tokens(self) -> None:
        self.emulator.expire_tokens()  # the next call with an old token: 99991663

    def sample_payload(
        self, text: str, *, message_id: str, sender: str = "u1", conversation: str = "c1"
    ) -> Any:
        # The 1:1 chat of ``sender``, as ``send`` uses.
        return self._known(self.emulator.message(text, message_id=message_id, sender=sender))

    async def push_raw(self, payload: Any, *, timeout: float = 5.0) -> bool:
        # A frame's payload is bytes: a str is carried as its UTF-8 (lone surrogates included).
        if isinstance(payload, bytes):
            raw = payload
        elif isinstance(payload, str):
            raw = payload.encode("utf-8", errors="surrogatepass")
        else:
            raw = json.dumps(payload).encode()  # ASCII escapes, as the contract asks
        pushed = await self.emulator.push_event(raw, repush=False, wait_connection=timeout)
        with contextlib.suppress(TimeoutError):
            return (await self.emulator.wait_acked(pushed.event_id, timeout=timeout)).ok
        return False

    def sample_frame(self, text: str, *, message_id: str, sender: str = "u1") -> dict[str, Any]:
        frame_id = secrets.token_hex(16)
        self._fresh_frames.add(frame_id)
        payload = self.sample_payload(text, message_id=message_id, sender=sender)
        # The fields of a pbbp2 DATA frame as the emulator sends an event (``service`` is the
        # connection's, which the driver does not check), headers in wire order.
        return {
            "SeqID": 0,
            "LogID": secrets.randbits(63),
            "service": 33554678,
            "method": DATA,
            "headers": {
                "type": "event",
                "message_id": frame_id,
                "sum": "1",
                "seq": "0",
                "trace_id": secrets.token_hex(8),
            },
            "payload": json.dumps(payload),
        }

    def frame_vocabulary(self) -> tuple[Any, ...]:
        return (
            *(0, 1, 2, -1, 2**31 - 1, -(2**31), 2**63, 2**64 - 1),
            *("event", "card", "ping", "pong", "", "0", "1", "2", "-1", "64", "65"),
            *("1.5", " 1", "9" * 40, "NaN", math.inf, 0.5, b"\xff\xfe", "{}", "null"),
            '{"PingInterval": 0.001}',
            '{"code": 200}',
        )

    def split_frame(self, frame: dict[str, Any], parts: int) -> list[dict[str, Any]] | None:
        payload = str(frame["payload"]).encode()
        size = -(-len(payload) // parts)  # ceiling: ``parts`` chunks, the last maybe shorter
        chunks = [payload[i * size : (i + 1) * size] for i in range(parts)]
        headers = frame["headers"]
        return [
            {
                **frame,
                "headers": {**headers, "sum": str(parts), "seq": str(seq)},
                "payload": chunk,
            }
            for seq, chunk in enumerate(chunks)
        ]

    async def push_frame(self, frame: Any, *, wait_connection: float = 5.0) -> FramePush:
        if isinstance(frame, bytes):
            raw = frame
        elif isinstance(frame, str):
            raw = frame.encode("utf-8", "surrogatepass")
        elif isinstance(frame, dict):
            raw = encode_frame(frame)
        else:
            raw = json.dumps(frame).encode()  # not a protobuf at all
        expects, frame_id = self._expected_ack(raw)
        try:
            record = await push_raw_frame(
                self.emulator, raw, frame_id=frame_id, wait_connection=wait_connection
            )
        except EmulatorError as exc:
            if not _connection_went_away(exc):
                raise
            # The client closed the connection while reading it (a frame beyond its size limit).
            return FramePush(
                None, None, f"{_shorten(repr(frame))} (the connection ended meanwhile)"
            )
        return FramePush(expects, record, _shorten(repr(frame)))

    def _expected_ack(self, raw: bytes) -> tuple[bool | None, str | None]:
        """Whether Feishu would wait for an ACK of the frame ``raw`` (see ``FramePush``), and the
        fresh frame id an ACK would carry."""
        try:
            frame = Frame.from_bytes(raw)
            ids = [value for key, value in frame.headers if key == "message_id"]
        except Exception:
            return False, None  # no client can read an id from it
        fresh = len(ids) == 1 and ids[0] in self._fresh_frames
        if not fresh or frame.method != DATA:
            return (None if ids else False), None
        self._fresh_frames.discard(ids[0])
        total, seq = frame.header("sum"), frame.header("seq")
        if total in (None, "1") and seq in (None, "0"):
            return True, ids[0]
        with contextlib.suppress(ValueError):
            if int(total or "") > 1:
                return False, ids[0]  # a part: ACKed once the payload is whole, if ever
        return None, ids[0]

    def reply_record(self, message_id: str) -> ReplyRecord:
        replies = self.emulator.replies(message_id)
        cards = [self.emulator.cards[m.card_id] for m in replies if m.card_id is not None]
        return ReplyRecord(
            replies=len(replies), unfinished=sum(1 for card in cards if not card.finished)
        )


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# -- pbbp2 frames from any field values --------------------------------------------------------------
#
# Written by hand rather than with the protobuf runtime, which refuses what a hostile server may
# send: a value of the wrong wire type, a required field left out, a string that is not UTF-8.

#: ``pbbp2.Frame``'s fields: name -> (number, kind); ``headers`` holds ``Header {key, value}``
_FIELDS: dict[str, tuple[int, str]] = {
    "SeqID": (1, "int"),
    "LogID": (2, "int"),
    "service": (3, "int"),
    "method": (4, "int"),
    "headers": (5, "headers"),
    "payload_encoding": (6, "bytes"),
    "payload_type": (7, "bytes"),
    "payload": (8, "bytes"),
    "LogIDNew": (9, "bytes"),
}


def encode_frame(fields: dict[str, Any]) -> bytes:
    """A pbbp2 frame with these fields, each as the wire can carry it: an int in a number field is
    a varint (wrapped to 64 bits), a str or bytes in a text field is its bytes (lone surrogates as
    invalid UTF-8); any other value is junk of its own wire type in the same field (a float is a
    fixed64, a list a run of repeated fields, a dict its JSON text), None leaves the field out
    (a required one is then missing), and an unknown name is an unknown field."""
    out = bytearray()
    for name, value in fields.items():
        unknown = 100 + zlib.crc32(name.encode("utf-8", "replace")) % 900
        number, kind = _FIELDS.get(name, (unknown, ""))
        if kind == "headers" and isinstance(value, dict):
            for key, header in value.items():
                # A list: the header repeated, once per item; None: a header without its value.
                for item in header if isinstance(header, list) else [header]:
                    out += _length_delimited(number, _field(1, key) + _field(2, item))
        elif isinstance(value, list):
            for item in value:
                out += _field(number, item)
        else:
            out += _field(number, value)
    return bytes(out)


def _field(number: int, value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, int):  # bools too
        return _varint(number << 3) + _varint(int(value))
    if isinstance(value, float):
        return _varint(number << 3 | 1) + struct.pack("<d", value)
    if isinstance(value, bytes):
        return _length_delimited(number, value)
    if isinstance(value, str):
        return _length_delimited(number, value.encode("utf-8", "surrogatepass"))
    return _length_delimited(number, json.dumps(value).encode())


def _length_delimited(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative numbers as two's complement, as protobuf writes them
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)
