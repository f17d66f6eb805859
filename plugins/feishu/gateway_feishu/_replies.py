"""Reply channels: a CardKit streaming card, or plain messages.

* :class:`CardReply` — the CardKit flow: create a card entity (JSON 2.0, ``streaming_mode`` on, one
  markdown element showing the "thinking" text), send it as a reply to the user's message *by
  reference* (``{"type": "card", "data": {"card_id": ...}}``, with a ``uuid`` derived from the
  reply id, so a resumed reply is not sent twice), replace the element's content with the full text
  on every update, and end by turning ``streaming_mode`` off; with feedback, a last full update
  adds the buttons (callback behaviours carrying ``{reply_id, rating}``).  Every operation on a
  card carries a strictly increasing ``sequence`` (see ``_cardstore``) and is paced per card
  (Feishu allows 10 operations a second on one card).

  Feishu switches a card's streaming mode off by itself after 10 minutes: the next element update
  is refused with 200850, later ones with 300309.  An update then turns streaming on again (once)
  and is tried again; the end of the reply, if streaming is off, replaces the whole card instead
  (a full update needs no streaming mode, and brings the buttons along).  Only when that fails too
  does the answer go out as a message.  A card is sent once (Feishu refuses a second send of a
  card entity): a reply resumed after a crash whose send was not recorded treats Feishu's refusal
  as "sent already".
* :class:`MessageReply` — one message per part (a ``post`` whose ``md`` element renders markdown),
  for ``reply_mode = "text"`` and as the fallback when a card cannot be made: the user gets a plain
  answer rather than none.  Cards that keep failing make the driver skip them for a while (the
  driver's :class:`~gateway.breaker.Breaker`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import Any

import attrs

from gateway.breaker import Breaker, card_failed
from gateway.driver import MessageReplyChannel, ReplyChannel
from gateway.models import Incoming
from gateway.ratelimit import TokenBucket
from gateway_feishu._cardstore import CardRecord, CardStore, Sequence
from gateway_feishu._openapi import OpenApi, OpenApiError
from gateway_feishu.settings import FeishuSettings

__all__ = [
    "ANSWER_ELEMENT",
    "CARD_SENT_ALREADY",
    "STREAMING_CLOSED",
    "CardReply",
    "MessageReply",
    "message_content",
    "send_uuid",
]

#: The element id of the streamed markdown in every card (CardKit addresses elements by id).
ANSWER_ELEMENT = "answer"
_CARDS = "/open-apis/cardkit/v1/cards"
_SUMMARY_LENGTH = 60
#: Streaming mode is off: 200850 once Feishu's 10-minute streaming timeout struck, 300309 after.
STREAMING_CLOSED = frozenset({200850, 300309})
#: Sending a card entity that was sent already (Feishu sends each card once).  The code is the
#: generic "card content failed" one; the docs state the rule, not its error (see the README).
CARD_SENT_ALREADY = 230099


def send_uuid(key: str) -> str:
    """Feishu's ``uuid`` for a send (deduplicated by Feishu for an hour; at most 50 characters)."""
    return hashlib.sha256(key.encode()).hexdigest()[:40]


def message_content(text: str, *, markdown: bool, title: str = "") -> tuple[str, str]:
    """``(msg_type, content)`` of a message showing ``text``: a ``post`` whose ``md`` element
    renders markdown, or plain ``text``."""
    if not markdown:
        return "text", json.dumps({"text": text}, ensure_ascii=False)
    post = {"zh_cn": {"title": title, "content": [[{"tag": "md", "text": text}]]}}
    return "post", json.dumps(post, ensure_ascii=False)


@attrs.frozen
class ReplyTools:
    """What every reply channel of one driver shares."""

    api: OpenApi
    settings: FeishuSettings
    store: CardStore
    breaker: Breaker
    log: logging.LoggerAdapter[logging.Logger]


class MessageReply(MessageReplyChannel):
    """Messages: nothing to show until a part is complete."""

    def __init__(self, tools: ReplyTools, message: Incoming, index: int = 0) -> None:
        self._tools = tools
        self._message = message
        self._index = index

    async def fail(self, text: str, error: str) -> None:
        await self.send(_with_error(text, error, self._tools.settings))

    def follow_up(self, index: int) -> MessageReply:
        return MessageReply(self._tools, self._message, index)

    async def send(self, text: str) -> None:
        msg_type, content = message_content(text, markdown=True)
        key = f"{self._message.reply_id}.{self._index}.message"
        await self._tools.api.call(
            "POST",
            f"/open-apis/im/v1/messages/{self._message.message_id}/reply",
            {"msg_type": msg_type, "content": content, "uuid": send_uuid(key)},
        )


class CardReply(ReplyChannel):
    def __init__(self, tools: ReplyTools, message: Incoming, index: int = 0) -> None:
        self._tools = tools
        self._message = message
        self._index = index
        self.key = f"{message.reply_id}.{index}"
        self._record: CardRecord | None = None
        self._sequence: Sequence | None = None
        # Feishu limits operations per card (10/s); one bucket per card keeps them apart.  The
        # settings keep the interval at 0.1 s or more.
        self._pace = TokenBucket(1 / tools.settings.card_update_interval, burst=1)
        # Set when the card could not be made: the rest of this reply goes out as a message.
        self._fallback: MessageReply | None = None
        # Set when streaming could not be turned on again: updates wait for the full final card.
        self._stream_lost = False

    @property
    def card_id(self) -> str:
        return self._record.card_id if self._record is not None else ""

    async def start(self) -> None:
        await self._ensure_card(self._tools.settings.thinking_text)

    async def update(self, text: str) -> None:
        if await self._ensure_card(text) and self._fallback is None and not self._stream_lost:
            await self._stream(text)

    async def finish(self, text: str, *, last: bool, feedback: bool) -> None:
        await self._end(text, buttons=feedback)

    async def fail(self, text: str, error: str) -> None:
        await self._end(_with_error(text, error, self._tools.settings), buttons=False)

    def follow_up(self, index: int) -> CardReply:
        return CardReply(self._tools, self._message, index)

    async def _stream(self, text: str) -> None:
        """Show ``text`` in the streaming element; when Feishu closed streaming (its 10-minute
        timeout), turn it on again once and try again."""
        try:
            await self._content(text)
            return
        except OpenApiError as exc:
            if exc.code not in STREAMING_CLOSED:
                raise
            self._tools.log.info(
                "Feishu closed streaming on card %s (code %d): turning it on again",
                self.card_id,
                exc.code,
                extra={"event": "card_streaming_closed"},
            )
        try:
            await self._streaming(True)
            await self._content(text)
        except OpenApiError:
            # The final full update shows the answer; updates until then would be refused too.
            self._stream_lost = True
            raise

    async def _end(self, text: str, *, buttons: bool) -> None:
        await self._ensure_card(text)
        if self._fallback is None:
            try:
                await self._close(text, buttons=buttons)
            except Exception as exc:
                # The answer must reach the user even when the card cannot take it.
                self._degrade(exc)
        if self._fallback is not None:
            await self._fallback.finish(text, last=True, feedback=False)

    async def _close(self, text: str, *, buttons: bool) -> None:
        """The final text, streaming off and, with ``buttons``, the feedback buttons.

        The streamed way (element content, settings, then a full update for the buttons) keeps the
        typewriter effect to the end; when it fails (streaming closed by Feishu, or any refusal), one
        full update of the card does it all, as it needs no streaming mode."""
        if not self._stream_lost:
            try:
                await self._content(text)
                await self._streaming(False, summary=text)
            except Exception as exc:
                self._tools.log.info(
                    "finishing card %s with a full update (%s: %s)",
                    self.card_id,
                    type(exc).__name__,
                    exc,
                    extra={"event": "card_full_update"},
                )
            else:
                if buttons:
                    await self._buttons(text)
                return
        await self._replace(text, buttons=buttons)

    async def _replace(self, text: str, *, buttons: bool) -> None:
        """One full update of the card: the final text, with ``buttons`` the feedback buttons."""
        await self._card_op("PUT", "", {"card": _card(self._final(text, buttons=buttons))})

    async def _buttons(self, text: str) -> None:
        try:
            await self._replace(text, buttons=True)
        except Exception as exc:
            # The answer is final already; only the buttons are missing.
            self._tools.log.warning(
                "feedback buttons not shown on card %s: %s: %s",
                self.card_id,
                type(exc).__name__,
                exc,
                extra={"event": "card_failed"},
            )

    async def _ensure_card(self, initial: str) -> bool:
        """Make and send the card on first use; True if it existed already (``initial`` not shown).

        A card recorded before a restart is reused: its streaming mode is switched on again (it may
        have been finished just before the crash) and it is sent if it was not yet."""
        if self._record is not None or self._fallback is not None:
            return True
        tools = self._tools
        if tools.breaker.open:
            self._fallback = MessageReply(tools, self._message, self._index)
            return False
        existed = True
        try:
            record = await tools.store.get(self.key)
            if record is None:
                existed = False
                data = await self._call("POST", _CARDS, _card(self._thinking(initial)))
                record = CardRecord.new(str(data["card_id"]))
                await tools.store.put(self.key, record)
            self._record = record
            self._sequence = Sequence(record.created)
            if existed:
                await self._streaming(True)
            if not record.message_id:
                message_id = await self._send(record, resumed=existed)
                self._record = attrs.evolve(record, message_id=message_id)
                await tools.store.put(self.key, self._record)
        except Exception as exc:
            self._record = None
            self._degrade(exc)
            return False
        tools.breaker.success()
        return existed

    async def _send(self, record: CardRecord, *, resumed: bool) -> str:
        """Send the card as the reply; the message id (``-`` if not known)."""
        content = {"type": "card", "data": {"card_id": record.card_id}}
        try:
            sent = await self._call(
                "POST",
                f"/open-apis/im/v1/messages/{self._message.message_id}/reply",
                {
                    "msg_type": "interactive",
                    "content": json.dumps(content),
                    # Within an hour Feishu answers a repeated send with the first message.
                    "uuid": send_uuid(self.key),
                },
            )
        except OpenApiError as exc:
            if not resumed or exc.code != CARD_SENT_ALREADY:
                raise
            # A resumed card that streaming could be turned on for exists and is ours: the send
            # before the crash landed (more than an hour ago) and the user has the card.
            self._tools.log.info("card %s was sent before the restart; updating it", record.card_id)
            return "-"
        return str(sent.get("message_id", "-"))

    def _degrade(self, exc: Exception) -> None:
        tools = self._tools
        self._fallback = MessageReply(tools, self._message, self._index)
        card_failed(tools.breaker, tools.log, exc, reply_as="a message", answers_as="messages")

    async def _content(self, text: str) -> None:
        await self._card_op("PUT", f"/elements/{ANSWER_ELEMENT}/content", {"content": text})

    async def _streaming(self, on: bool, summary: str = "") -> None:
        config: dict[str, Any] = {"streaming_mode": on}
        if summary:
            config["summary"] = {"content": _summary(summary)}
        settings = json.dumps({"config": config}, ensure_ascii=False)
        await self._card_op("PATCH", "/settings", {"settings": settings})

    async def _card_op(self, method: str, suffix: str, body: dict[str, Any]) -> None:
        """One operation on the card, with the next sequence number and its own ``uuid``; its
        retries repeat both, so an attempt that landed unseen is a replay, not a conflict."""
        assert self._sequence is not None and self._record is not None
        body = {**body, "sequence": self._sequence.next(), "uuid": str(uuid.uuid4())}
        await self._call(method, f"{_CARDS}/{self._record.card_id}{suffix}", body)

    async def _call(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        await self._pace.acquire()
        return await self._tools.api.call(method, path, body)

    def _thinking(self, text: str) -> dict[str, Any]:
        return {
            "schema": "2.0",
            "config": {"streaming_mode": True, "summary": {"content": _summary(text)}},
            "body": {"elements": [_markdown(text)]},
        }

    def _final(self, text: str, *, buttons: bool) -> dict[str, Any]:
        s = self._tools.settings
        elements = (
            [
                {
                    "tag": "button",
                    "element_id": f"feedback_{i}",
                    "type": "default",
                    "size": "small",
                    "text": {"tag": "plain_text", "content": label},
                    "behaviors": [
                        {
                            "type": "callback",
                            "value": {"reply_id": self._message.reply_id, "rating": value},
                        }
                    ],
                }
                for i, (label, value) in enumerate(
                    zip(s.feedback_labels, s.feedback_values, strict=True)
                )
            ]
            if buttons
            else []
        )
        return {
            "schema": "2.0",
            "config": {"streaming_mode": False, "summary": {"content": _summary(text)}},
            "body": {"elements": [_markdown(text), *elements]},
        }


def _markdown(text: str) -> dict[str, Any]:
    return {"tag": "markdown", "element_id": ANSWER_ELEMENT, "content": text}


def _card(card: dict[str, Any]) -> dict[str, Any]:
    return {"type": "card_json", "data": json.dumps(card, ensure_ascii=False)}


def _summary(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:_SUMMARY_LENGTH]


def _with_error(text: str, error: str, settings: FeishuSettings) -> str:
    note = f"{settings.error_prefix} {error}".strip()
    return f"{text}\n\n> {note}" if text else note
