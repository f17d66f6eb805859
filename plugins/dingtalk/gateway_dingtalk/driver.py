"""The ``dingtalk-stream`` driver: a DingTalk robot in Stream mode.

One ``serve()`` is one stream session: open a connection (``/v1.0/gateway/connections/open`` over
async HTTP, a fresh one-time ticket each time), connect the websocket (through the proxy, if any),
then read frames until the connection ends:

* ``SYSTEM ping`` is acknowledged with its ``opaque``; ``SYSTEM disconnect`` is acknowledged and
  ends the session at once with ``ConnectionLost`` (the supervisor reconnects without delay);
* a robot message is handed to the core (durable inbox, dedup on ``msgId``) and only then
  acknowledged, on the socket it came from — before any agent work, so DingTalk never redelivers
  because an answer is slow, and never loses a message it was told we have;
* a card button click is recorded as feedback and answered within DingTalk's 2 s with the card
  update in the acknowledgement itself;
* no frame at all for ``frame_timeout`` means a dead socket: ``ConnectionLost``.

Nothing of ``DingTalkStreamClient.start()`` is used: it retries forever with fixed sleeps, blocks the
event loop with ``requests`` and cannot be stopped.  The SDK's frame and message classes are.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from dingtalk_stream import AckMessage, CallbackMessage, CardCallbackMessage, SystemMessage
from dingtalk_stream.card_callback import Card_Callback_Router_Topic

from gateway.driver import Capabilities, Driver, DriverContext, ReplyChannel
from gateway.errors import (
    AuthenticationError,
    ConnectionLost,
    DriverConfigError,
    RetryableError,
    SendRejected,
    ShuttingDown,
)
from gateway.models import FeedbackEvent, Incoming, Outgoing, TargetKind
from gateway.proxy import ProxiedSession
from gateway.ratelimit import rate_limits
from gateway.secrets import url_secret
from gateway.websocket import FrameTasks, messages
from gateway_dingtalk._openapi import OpenApi, OpenApiError
from gateway_dingtalk._payload import TOPIC_BOT, incoming_from_dingtalk, resolve_attachments
from gateway_dingtalk._replies import (
    AICardReply,
    CardHealth,
    LegacyCardReply,
    MessageReply,
    reply_id_of,
    send_robot_message,
)
from gateway_dingtalk.settings import DingTalkSettings

__all__ = ["DingTalkDriver"]

_OPEN_PATH = "/v1.0/gateway/connections/open"
_USER_AGENT = "imgateway-dingtalk/0.1"
# Card clicks must be answered within 2 s (DingTalk); recording the feedback gets most of it.
_FEEDBACK_BUDGET = 1.5
# What reading a hostile frame with json and the SDK's parsers raises: RecursionError for JSON
# nested thousands deep, OverflowError for a header like ``"time": Infinity`` (the SDK int()s it).
_UNREADABLE = (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError)


class DingTalkDriver(Driver):
    title = "DingTalk Stream"
    description = "A DingTalk robot over Stream mode: streamed AI cards with feedback buttons."
    settings_class = DingTalkSettings
    settings: DingTalkSettings

    def __init__(self, settings: DingTalkSettings, context: DriverContext) -> None:
        super().__init__(settings, context)
        self._log = context.logger
        self._session = ProxiedSession(settings.proxy, _USER_AGENT)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._closing = False
        self._frame_tasks = FrameTasks()
        # Every instance (and restart) of one app shares the app's quota.  No burst: DingTalk counts
        # calls per second, and a full bucket plus its refill would allow twice the rate in one.
        bucket = rate_limits.bucket(f"dingtalk:{settings.client_id}", settings.rate, burst=1)
        self.api = OpenApi(settings, self._session, bucket, self._log, context.api_call)
        self._cards = CardHealth(settings, self._log)

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]  # depends on the settings
        mode = self.settings.reply_mode
        cards = mode in ("ai_card", "card")
        return Capabilities(
            edits=cards,
            streams=mode == "ai_card",
            feedback=mode == "ai_card" and bool(self.settings.card_feedback_key),
            proactive=True,
            max_text_length=(
                self.settings.card_max_length if cards else self.settings.message_max_length
            ),
        )

    @classmethod
    def exclusive_key(cls, settings: DingTalkSettings) -> str | None:
        return settings.client_id

    # -- connection ----------------------------------------------------------------------------

    async def serve(self) -> None:
        self._closing = False
        endpoint, ticket = await self._open_connection()
        # The ticket opens a connection for the app: masked in logs like the client secret (an
        # error from aiohttp may name the URL).
        url = f"{endpoint}?ticket={url_secret(ticket)}"
        try:
            # heartbeat: websocket pings every 20 s, so a half-open TCP connection is noticed.
            ws = await self._session().ws_connect(
                url, heartbeat=20.0, timeout=aiohttp.ClientWSTimeout(ws_close=1.0)
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise RetryableError(f"stream handshake refused: HTTP {exc.status}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryableError(f"stream connection failed: {type(exc).__name__}: {exc}") from exc
        self._ws = ws
        self.context.connected()
        try:
            await self._read_frames(ws)
        finally:
            self._ws = None
            if not ws.closed:
                # Asked to reconnect: the socket still carries ACKs for a moment (DingTalk closes
                # it 10 s later), so the messages being stored are ACKed on it, not pushed again.
                await self._frame_tasks.drain()
            await ws.close()
            await self._frame_tasks.cancel()

    async def _open_connection(self) -> tuple[str, str]:
        body = {
            "clientId": self.settings.client_id,
            "clientSecret": self.settings.client_secret.reveal(),
            "subscriptions": [
                {"type": "CALLBACK", "topic": TOPIC_BOT},
                {"type": "CALLBACK", "topic": Card_Callback_Router_Topic},
            ],
            "ua": _USER_AGENT,
            "localIp": "",
        }
        url = self.settings.endpoint.rstrip("/") + _OPEN_PATH
        status, data = await self.api.exchange("POST", url, body)
        if status in (401, 403):
            code = data.get("code", status) if isinstance(data, dict) else status
            raise AuthenticationError(
                f"DingTalk rejected the client id/secret of instance {self.context.instance} "
                f"(client id {self.settings.client_id}: {code})"
            )
        if status == 404:
            raise DriverConfigError(f"{url} does not exist: check the endpoint setting")
        if status != 200 or not isinstance(data, dict):
            raise RetryableError(f"opening a stream connection failed: HTTP {status}")
        endpoint, ticket = data.get("endpoint"), data.get("ticket")
        if not isinstance(endpoint, str) or not isinstance(ticket, str) or not endpoint:
            raise RetryableError("DingTalk answered the connection request without endpoint/ticket")
        return endpoint, ticket

    async def _read_frames(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in messages(
            ws,
            timeout=self.settings.frame_timeout,
            platform="DingTalk",
            closing=lambda: self._closing,
        ):
            # DingTalk frames are JSON text; binary messages carry nothing for us.
            if msg.type is aiohttp.WSMsgType.TEXT:
                self.context.frame_received()
                await self._on_frame(ws, msg.data)

    async def close(self) -> None:
        self._closing = True
        # Messages being stored are ACKed before the socket closes: one stored but not ACKed would
        # be delivered again, perhaps to another replica, and answered twice.
        await self._frame_tasks.drain()
        ws = self._ws
        if ws is not None:
            await ws.close()
        await self._frame_tasks.cancel()
        await self._session.close()

    # -- frames --------------------------------------------------------------------------------

    async def _on_frame(self, ws: aiohttp.ClientWebSocketResponse, raw: str) -> None:
        try:
            frame = json.loads(raw)
            kind = frame["type"]
            headers = frame.get("headers") or {}
            frame_id = str(headers["messageId"]) if "messageId" in headers else ""
            topic = headers.get("topic", "")
        except _UNREADABLE as exc:
            self._log.warning("ignoring a malformed frame (%s)", exc, extra={"event": "bad_frame"})
            return
        if kind == SystemMessage.TYPE:
            await self._on_system(ws, frame, frame_id, topic)
        elif kind == CallbackMessage.TYPE and topic in (TOPIC_BOT, Card_Callback_Router_Topic):
            # Handled in a task: the inbox write of one message must not hold up the next frame
            # (and the core batches concurrent writes into one commit).
            handler = self._on_robot_message if topic == TOPIC_BOT else self._on_card_click
            self._frame_tasks.spawn(handler(ws, frame, frame_id))
        elif frame_id:
            # Unsubscribed topics and events: say so, as the protocol asks, so nothing is retried.
            code = 200 if kind == "EVENT" else AckMessage.STATUS_NOT_IMPLEMENT
            data = {"status": "SUCCESS", "message": "ignored"} if kind == "EVENT" else None
            await self._ack(ws, frame_id, data, code=code)

    async def _on_system(
        self, ws: aiohttp.ClientWebSocketResponse, frame: dict[str, Any], frame_id: str, topic: str
    ) -> None:
        try:
            message = SystemMessage.from_dict(frame)
        except _UNREADABLE as exc:
            self._log.warning(
                "acknowledging an unreadable system frame %s (%s)",
                frame_id,
                exc,
                extra={"event": "bad_frame"},
            )
            if frame_id:
                # Echo what came, so a ping with odd data still counts as answered.
                await self._ack(ws, frame_id, frame.get("data"))
            return
        if topic == "ping":
            await self._ack(ws, frame_id, message.data)
        elif topic == SystemMessage.TOPIC_DISCONNECT:
            if frame_id:
                await self._ack(ws, frame_id, message.data)
            reason = message.data.get("reason", "") if isinstance(message.data, dict) else ""
            raise ConnectionLost(f"DingTalk asked to reconnect ({reason or 'no reason given'})")
        elif frame_id:
            await self._ack(ws, frame_id, message.data)

    async def _on_robot_message(
        self, ws: aiohttp.ClientWebSocketResponse, frame: dict[str, Any], frame_id: str
    ) -> None:
        try:
            data = CallbackMessage.from_dict(frame).data
            message = incoming_from_dingtalk(self.context.instance, data, frame_id)
        except _UNREADABLE as exc:
            # A payload we cannot answer: acknowledge it, a redelivery would be the same.
            self._log.warning(
                "acknowledging an unreadable robot message (frame %s): %s: %s",
                frame_id,
                type(exc).__name__,
                exc,
                extra={"event": "bad_message"},
            )
            await self._ack(ws, frame_id, {"response": None})
            return
        try:
            await self.context.deliver(message)
        except ShuttingDown:
            return  # not acknowledged: DingTalk delivers it again, to us after a restart or elsewhere
        except Exception:
            self._log.exception(
                "could not store message %s; not acknowledging it so DingTalk delivers it again",
                message.message_id,
                extra={"message_id": message.message_id},
            )
            return
        await self._ack(ws, frame_id, {"response": None})

    async def _on_card_click(
        self, ws: aiohttp.ClientWebSocketResponse, frame: dict[str, Any], frame_id: str
    ) -> None:
        s = self.settings
        response: dict[str, Any] | None = None
        try:
            click = CardCallbackMessage.from_dict(CallbackMessage.from_dict(frame).data)
            private = (
                click.content.get("cardPrivateData", {}) if isinstance(click.content, dict) else {}
            )
            params = private.get("params") or {}
            actions = private.get("actionIds") or []
            rating = str(params.get("rating", ""))
            if not rating:
                for action in actions:
                    if action in s.card_action_ids:
                        rating = s.feedback_values[s.card_action_ids.index(action)]
                        break
            if rating and click.card_instance_id and click.user_id:
                event = FeedbackEvent.create(
                    instance=self.context.instance,
                    reply_id=reply_id_of(click.card_instance_id),
                    user_id=str(click.user_id),
                    rating=rating,
                )
                async with asyncio.timeout(_FEEDBACK_BUDGET):
                    await self.context.feedback(event)
                response = self._feedback_response(rating)
            else:
                self._log.info("card click without a known rating ignored: %s", actions)
        except _UNREADABLE as exc:
            self._log.warning(
                "ignoring an unreadable card callback: %s: %s", type(exc).__name__, exc
            )
        except Exception as exc:
            self._log.warning("recording feedback failed: %s: %s", type(exc).__name__, exc)
        await self._ack(ws, frame_id, {"response": response})

    def _feedback_response(self, rating: str) -> dict[str, Any]:
        """The card update carried in the acknowledgement: hide the buttons, show the choice."""
        s = self.settings
        params: dict[str, str] = {}
        if s.card_feedback_key:
            params[s.card_feedback_key] = "0"
        if s.card_rating_key and rating in s.feedback_values:
            params[s.card_rating_key] = s.feedback_labels[s.feedback_values.index(rating)]
        return {
            "cardData": {"cardParamMap": params},
            "cardUpdateOptions": {"updateCardDataByKey": True},
        }

    async def _ack(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        frame_id: str,
        data: Any,
        *,
        code: int = AckMessage.STATUS_OK,
    ) -> None:
        ack = AckMessage()
        ack.code = code
        ack.headers.message_id = frame_id
        ack.headers.content_type = "application/json"
        ack.message = "OK" if code == AckMessage.STATUS_OK else "not supported"
        ack.data = data
        try:
            await ws.send_str(json.dumps(ack.to_dict(), ensure_ascii=False))
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            # The socket is gone; DingTalk will redeliver and the inbox will recognise it.
            self._log.info("acknowledgement of frame %s not sent: %s", frame_id, exc)

    # -- replies -------------------------------------------------------------------------------

    async def prepare(self, message: Incoming) -> Incoming:
        # Download codes become URLs only now, after the ACK: the ACK must never wait for them.
        return await resolve_attachments(self.api, self.settings.robot, message)

    def open_reply(self, message: Incoming) -> ReplyChannel:
        mode = self.settings.reply_mode
        if mode == "ai_card":
            return AICardReply(self.api, self.settings, message, self._cards)
        if mode == "card":
            return LegacyCardReply(self.api, self.settings, message)
        return MessageReply(self.api, self.settings, message, markdown=mode == "markdown")

    async def send(self, message: Outgoing) -> str:
        # The OpenAPI send calls, not a session webhook: nothing was asked, so there is no session.
        group = message.to if message.target is TargetKind.CONVERSATION else ""
        try:
            return await send_robot_message(
                self.api,
                self.settings.robot,
                group=group,
                user="" if group else message.to,
                text=message.text,
                markdown=message.markdown,
                title=message.heading,
            )
        except OpenApiError as exc:
            raise SendRejected(str(exc)) from exc
