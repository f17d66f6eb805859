"""Reply channels for each reply mode.

* :class:`AICardReply` — an AI card created at once with the "thinking" text
  (``createAndDeliver``, ``callbackType: STREAM`` so feedback clicks come back over the stream),
  streamed with ``PUT /v1.0/card/streaming`` (``isFull``), finished with ``isFinalize`` or failed
  with ``isError``.  The card id (``outTrackId``) is the message's reply id, so a message resumed
  after a crash updates its card instead of creating a second one.
* :class:`LegacyCardReply` — the reference design's interactive card (``StandardCard``), for apps
  from before DingTalk deprecated it; its buttons can only call back over HTTP, so no feedback.
* :class:`MessageReply` — one markdown or text message per part, through the session webhook while
  it is valid and the OpenAPI send calls after it expired.

Cards that keep failing make the driver degrade to :class:`MessageReply` for a while (see
``CardHealth``): a user gets a plain answer rather than none.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from gateway.breaker import Breaker, card_failed
from gateway.driver import MessageReplyChannel, ReplyChannel
from gateway.models import ConversationKind, Incoming
from gateway_dingtalk._openapi import OpenApi, OpenApiError, new_guid
from gateway_dingtalk.settings import DingTalkSettings

__all__ = [
    "AICardReply",
    "CardHealth",
    "LegacyCardReply",
    "MessageReply",
    "out_track_id",
    "send_robot_message",
]

# A session webhook is not used in its last minute: the call could land after it expired.
_WEBHOOK_MARGIN_MS = 60_000


def out_track_id(message: Incoming, index: int) -> str:
    """The card id of part ``index``: derived, never random, so retries and resumes are idempotent."""
    return message.reply_id if index == 0 else f"{message.reply_id}.{index}"


def reply_id_of(track_id: str) -> str:
    return track_id.split(".", 1)[0]


class CardHealth:
    """After ``degrade_after`` card failures in a row, cards rest ``degrade_for`` s (the core's
    :class:`~gateway.breaker.Breaker`), and each failure and the resting are logged."""

    def __init__(
        self, settings: DingTalkSettings, logger: logging.LoggerAdapter[logging.Logger]
    ) -> None:
        self._breaker = Breaker(settings.degrade_after, settings.degrade_for)
        self._log = logger

    @property
    def degraded(self) -> bool:
        return self._breaker.open

    def ok(self) -> None:
        self._breaker.success()

    def failed(self, exc: Exception) -> None:
        card_failed(self._breaker, self._log, exc, reply_as="markdown", answers_as="markdown")


class _Target:
    """Where a reply goes, read from the stored payload (so it also works after a restart)."""

    def __init__(self, message: Incoming, settings: DingTalkSettings) -> None:
        raw = message.raw
        self.message = message
        self.group = message.conversation_kind is ConversationKind.GROUP
        self.conversation_id = message.conversation_id
        self.staff_id = str(raw.get("senderStaffId") or "")
        self.nick = str(raw.get("senderNick") or message.sender_name)
        self.webhook = str(raw.get("sessionWebhook") or "")
        self.webhook_expires = int(raw.get("sessionWebhookExpiredTime") or 0)
        self.robot = str(raw.get("robotCode") or settings.robot)

    @property
    def webhook_usable(self) -> bool:
        return bool(self.webhook) and time.time() * 1000 < self.webhook_expires - _WEBHOOK_MARGIN_MS


class _Paced:
    """Keeps ``interval`` seconds between the calls for one card (DingTalk limits edits per card)."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last = float("-inf")

    async def wait(self) -> None:
        delay = self._last + self._interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self._last = time.monotonic()

    def created(self) -> None:
        """The card was just created: its first edit need not wait (DingTalk's own tutorial
        streams right after ``createAndDeliver``; the limit is on edits, and calls for one card
        are serialised anyway)."""
        self._last = float("-inf")


class MessageReply(MessageReplyChannel):
    """Markdown or text messages: nothing to show until a part is complete."""

    def __init__(
        self, api: OpenApi, settings: DingTalkSettings, message: Incoming, *, markdown: bool
    ) -> None:
        self._api = api
        self._settings = settings
        self._target = _Target(message, settings)
        self._markdown = markdown

    async def fail(self, text: str, error: str) -> None:
        await self.send(f"{text}\n\n{error}" if text else error)

    def follow_up(self, index: int) -> MessageReply:
        return self

    async def send(self, text: str) -> None:
        target = self._target
        title = text.strip().splitlines()[0][:20] if text.strip() else "…"
        if target.webhook_usable:
            body: dict[str, Any] = (
                {"msgtype": "markdown", "markdown": {"title": title, "text": text}}
                if self._markdown
                else {"msgtype": "text", "text": {"content": text}}
            )
            if target.group and target.staff_id:
                body["at"] = {"atUserIds": [target.staff_id], "isAtAll": False}
            try:
                await self._api.post_webhook(target.webhook, body)
                return
            except OpenApiError:
                # Refused before its announced expiry (expired early, a skewed clock): nothing was
                # sent, so the OpenAPI send below delivers the answer instead.
                pass
        # The webhook expired (a late or resumed answer): the OpenAPI send calls need no session.
        if target.group:
            await send_robot_message(
                self._api,
                target.robot,
                group=target.conversation_id,
                text=text,
                markdown=self._markdown,
                title=title,
            )
        else:
            await send_robot_message(
                self._api,
                target.robot,
                user=target.staff_id,
                text=text,
                markdown=self._markdown,
                title=title,
            )


async def send_robot_message(
    api: OpenApi,
    robot: str,
    *,
    text: str,
    markdown: bool,
    title: str,
    group: str = "",
    user: str = "",
) -> str:
    """Send ``text`` as the robot to a group (``openConversationId``) or one user (staff id) with
    the OpenAPI send calls, which need no session webhook.  Returns DingTalk's ``processQueryKey``.

    Raises :class:`OpenApiError` when DingTalk refuses (a user it does not know comes back in
    ``invalidStaffIdList`` of an otherwise successful answer: that is a refusal too)."""
    key, param = (
        ("sampleMarkdown", {"title": title, "text": text})
        if markdown
        else ("sampleText", {"content": text})
    )
    common = {"robotCode": robot, "msgKey": key, "msgParam": json.dumps(param, ensure_ascii=False)}
    if group:
        path = "/v1.0/robot/groupMessages/send"
        result = await api.call("POST", path, {**common, "openConversationId": group})
    else:
        path = "/v1.0/robot/oToMessages/batchSend"
        result = await api.call("POST", path, {**common, "userIds": [user]})
        if user in (result.get("invalidStaffIdList") or []):
            raise OpenApiError(path, 200, "invalidStaffIdList", f"unknown user {user}")
    return str(result.get("processQueryKey") or "")


class AICardReply(ReplyChannel):
    def __init__(
        self,
        api: OpenApi,
        settings: DingTalkSettings,
        message: Incoming,
        health: CardHealth,
        index: int = 0,
    ) -> None:
        self._api = api
        self._settings = settings
        self._message = message
        self._target = _Target(message, settings)
        self._health = health
        self._index = index
        self.track_id = out_track_id(message, index)
        self._created = False
        self._pace = _Paced(settings.card_update_interval)
        # Set when the card could not be created: the rest of this reply goes out as markdown.
        self._fallback: MessageReply | None = None

    async def start(self) -> None:
        await self._ensure_card(self._settings.thinking_text)

    async def update(self, text: str) -> None:
        if not await self._ensure_card(text):
            return
        if self._fallback is None:
            await self._stream(text)

    async def finish(self, text: str, *, last: bool, feedback: bool) -> None:
        if await self._end(text, error=None) and feedback and self._settings.card_feedback_key:
            await self._show_feedback()

    async def fail(self, text: str, error: str) -> None:
        await self._end(text, error=error)

    async def _end(self, text: str, *, error: str | None) -> bool:
        """Finalise the card (or send the fallback message); True if the card was finalised."""
        await self._ensure_card(text)
        if self._fallback is None:
            try:
                if error is None:
                    await self._stream(text, finalize=True)
                else:
                    await self._stream(f"{text}\n\n> {error}" if text else error, error=True)
                return True
            except Exception as exc:
                # The answer must reach the user even when the card cannot take it.
                self._degrade(exc)
        assert self._fallback is not None
        if error is None:
            await self._fallback.finish(text, last=True, feedback=False)
        else:
            await self._fallback.fail(text, error)
        return False

    async def _show_feedback(self) -> None:
        try:
            await self._pace.wait()
            await self._api.call(
                "PUT",
                "/v1.0/card/instances",
                {
                    "outTrackId": self.track_id,
                    "cardData": {"cardParamMap": {self._settings.card_feedback_key: "1"}},
                    "cardUpdateOptions": {"updateCardDataByKey": True},
                    "userIdType": 1,
                },
            )
        except Exception as exc:
            # The answer is final already; only the buttons are missing.  Not worth a failed reply.
            self._health.failed(exc)

    def follow_up(self, index: int) -> AICardReply:
        return AICardReply(self._api, self._settings, self._message, self._health, index)

    async def _ensure_card(self, initial: str) -> bool:
        """Create the card on first use; True if it existed already (so ``initial`` was not shown)."""
        if self._created or self._fallback is not None:
            return True
        if self._health.degraded:
            self._fallback = MessageReply(self._api, self._settings, self._message, markdown=True)
            return False
        s = self._settings
        target = self._target
        params = {s.card_content_key: initial}
        for key, label in zip(s.card_label_keys, s.feedback_labels, strict=True):
            params[key] = label
        if s.card_feedback_key:
            params[s.card_feedback_key] = "0"
        body: dict[str, Any] = {
            "cardTemplateId": s.card_template_id,
            "outTrackId": self.track_id,
            "callbackType": "STREAM",
            "cardData": {"cardParamMap": params},
            "userIdType": 1,
        }
        if target.group:
            body["openSpaceId"] = f"dtv1.card//IM_GROUP.{target.conversation_id}"
            body["imGroupOpenSpaceModel"] = {"supportForward": True}
            deliver: dict[str, Any] = {"robotCode": target.robot}
            if target.staff_id:
                deliver["atUserIds"] = {target.staff_id: target.nick}
            body["imGroupOpenDeliverModel"] = deliver
        else:
            body["openSpaceId"] = f"dtv1.card//IM_ROBOT.{target.staff_id}"
            body["imRobotOpenSpaceModel"] = {"supportForward": True}
            body["imRobotOpenDeliverModel"] = {"spaceType": "IM_ROBOT"}
        await self._pace.wait()
        try:
            await self._api.call("POST", "/v1.0/card/instances/createAndDeliver", body)
        except OpenApiError as exc:
            if exc.code == "param.cardAlreadyExist":
                # Resumed after a crash: the card is there already, keep updating it.
                self._created = True
                return True
            self._degrade(exc)
            return False
        except Exception as exc:
            self._degrade(exc)
            return False
        self._health.ok()
        self._created = True
        self._pace.created()
        return False

    def _degrade(self, exc: Exception) -> None:
        self._fallback = MessageReply(self._api, self._settings, self._message, markdown=True)
        self._health.failed(exc)

    async def _stream(self, content: str, *, finalize: bool = False, error: bool = False) -> None:
        await self._pace.wait()
        await self._api.call(
            "PUT",
            "/v1.0/card/streaming",
            {
                "outTrackId": self.track_id,
                # One guid per logical update, reused by its retries, so a retry never repeats it.
                "guid": new_guid(),
                "key": self._settings.card_content_key,
                "content": content,
                "isFull": True,
                "isFinalize": finalize,
                "isError": error,
            },
        )


class LegacyCardReply(ReplyChannel):
    """The interactive "StandardCard" of the reference design (header = question, markdown body)."""

    def __init__(
        self, api: OpenApi, settings: DingTalkSettings, message: Incoming, index: int = 0
    ) -> None:
        self._api = api
        self._settings = settings
        self._message = message
        self._target = _Target(message, settings)
        self._index = index
        self.biz_id = out_track_id(message, index)
        self._sent = False
        self._pace = _Paced(settings.card_update_interval)

    def _card(self, text: str) -> str:
        card = {
            "config": {"autoLayout": True, "enableForward": True},
            "header": {"title": {"type": "text", "text": self._message.text[:60] or "…"}},
            "contents": [{"type": "markdown", "text": text, "id": f"answer_{self._index}"}],
        }
        return json.dumps(card, ensure_ascii=False)

    async def _show(self, text: str) -> None:
        await self._pace.wait()
        if self._sent:
            await self._api.call(
                "PUT",
                "/v1.0/im/robots/interactiveCards",
                {"cardBizId": self.biz_id, "cardData": self._card(text)},
            )
            return
        target = self._target
        body: dict[str, Any] = {
            "cardTemplateId": "StandardCard",
            "cardBizId": self.biz_id,
            "robotCode": target.robot,
            "cardData": self._card(text),
        }
        if target.group:
            body["openConversationId"] = target.conversation_id
        else:
            body["singleChatReceiver"] = json.dumps({"userId": target.staff_id})
        await self._api.call("POST", "/v1.0/im/v1.0/robot/interactiveCards/send", body)
        self._sent = True

    async def start(self) -> None:
        await self._show(self._settings.thinking_text)

    async def update(self, text: str) -> None:
        await self._show(text)

    async def finish(self, text: str, *, last: bool, feedback: bool) -> None:
        await self._show(text)

    async def fail(self, text: str, error: str) -> None:
        await self._show(f"{text}\n\n> {error}" if text else error)

    def follow_up(self, index: int) -> LegacyCardReply:
        return LegacyCardReply(self._api, self._settings, self._message, index)
