"""The ``feishu`` driver: a Feishu (or Lark) app's bot over the long connection (长连接).

One ``serve()`` is one session: ask ``/callback/ws/endpoint`` for a websocket URL (async HTTP, with
the app id and secret), connect it (through the proxy, if any), then read ``pbbp2`` frames until the
connection ends:

* the client pings (CONTROL ``type=ping``) every ``PingInterval`` seconds, which Feishu may change
  in a pong's ``ClientConfig`` payload; the server's reconnect advice (``ReconnectInterval``...) is
  ignored on purpose: reconnecting belongs to the core's supervisor;
* multi-part payloads (``sum > 1``) are put together by the frame's ``message_id``, within bounds
  (at most 64 parts and 4 MiB a payload, 16 MiB waiting in all): a frame that claims more is
  logged and dropped, not trusted with memory;
* an ``im.message.receive_v1`` event is handed to the core (durable inbox, deduplicated on the
  message id, which a re-push keeps) and ACKed right after: Feishu re-pushes events that are not
  ACKed within 3 s, so the ACK never waits for the agent.  A group message that does not mention
  the bot is ACKed and dropped;
* a ``card.action.trigger`` callback (a feedback button) is recorded and ACKed with a toast;
* no frame at all for ``frame_timeout`` (the pings make pongs come back) means a dead socket;
* closing lets the frames being stored finish and send their ACKs (a second at most) before the
  socket is closed: an event stored but not ACKed would be pushed again, perhaps to another
  replica.

Unreadable payloads are ACKed with code 200 and logged: a 500 would only make Feishu push the same
bytes again.  ``lark-oapi`` is not used at run time (see the README); its frame schema is, through
``_frames``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

import aiohttp

from gateway.breaker import Breaker
from gateway.driver import Capabilities, Driver, DriverContext, ReplyChannel
from gateway.errors import (
    AuthenticationError,
    DriverConfigError,
    RetryableError,
    SendRejected,
    ShuttingDown,
)
from gateway.models import Incoming, Outgoing, TargetKind
from gateway.proxy import ProxiedSession
from gateway.ratelimit import rate_limits
from gateway.secrets import url_secret
from gateway.websocket import FrameTasks, messages
from gateway_feishu._cardstore import CardStore
from gateway_feishu._frames import CONTROL, DATA, Frame, FrameError
from gateway_feishu._openapi import OpenApi, OpenApiError
from gateway_feishu._payload import (
    EVENT_CARD_ACTION,
    EVENT_MESSAGE,
    addressed_to_bot,
    event_type,
    feedback_from_feishu,
    incoming_from_feishu,
)
from gateway_feishu._replies import (
    CardReply,
    MessageReply,
    ReplyTools,
    message_content,
    send_uuid,
)
from gateway_feishu.settings import FeishuSettings

__all__ = ["FeishuDriver"]

_ENDPOINT_PATH = "/callback/ws/endpoint"
_USER_AGENT = "imgateway-feishu/0.1"
# Endpoint answer codes (lark-oapi ws/const.py).
_SYSTEM_BUSY, _INTERNAL_ERROR, _AUTH_FAILED, _CONNECTION_LIMIT = 1, 1000040343, 514, 1000040350
_DEFAULT_PING_INTERVAL = 120.0
# Card callbacks must be answered within Feishu's 3 s; recording the feedback gets most of it.
_FEEDBACK_BUDGET = 2.0
# A multi-part payload whose parts do not all arrive in this time is dropped (lark-oapi: 5 s);
# Feishu re-pushes the event, as it was not ACKed.
_PARTS_TTL = 10.0
# Bounds on multi-part payloads: a frame's ``sum`` header is the server's word, and one claiming
# 10**12 parts must not allocate them.  Events are a few KB; lark-oapi splits nothing near these.
_MAX_PARTS = 64
_MAX_PAYLOAD = 4 * 2**20  # one payload, all its parts together
_MAX_PENDING = 16 * 2**20  # every incomplete payload together
_MAX_INCOMPLETE = 256  # payloads waiting for parts at once
# Query parameters of the websocket URL that are credentials (access_key, ticket...): masked in
# logs like the app secret, as a failed connection may name the URL.
_CREDENTIAL_PARAM = ("key", "ticket", "token", "sign", "secret")
# What reading a hostile payload can raise (deep nesting: RecursionError from json).
_UNREADABLE = (ValueError, KeyError, TypeError, AttributeError, RecursionError)


class FeishuDriver(Driver):
    title = "Feishu / Lark"
    description = (
        "A Feishu or Lark bot over the long connection: CardKit streaming cards, feedback."
    )
    settings_class = FeishuSettings
    settings: FeishuSettings

    def __init__(self, settings: FeishuSettings, context: DriverContext) -> None:
        super().__init__(settings, context)
        self._log = context.logger
        self._session = ProxiedSession(settings.proxy, _USER_AGENT)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._closing = False
        self._tasks = FrameTasks()
        self._bot_open_id = ""
        self._ping_interval = _DEFAULT_PING_INTERVAL
        # Every instance (and restart) of one app shares the app's quota.  No burst: Feishu counts
        # calls in a sliding second, and a full bucket plus its refill would allow twice the rate.
        bucket = rate_limits.bucket(f"feishu:{settings.app_id}", settings.rate, burst=1)
        self.api = OpenApi(settings, self._session, bucket, self._log, context.api_call)
        self._tools = ReplyTools(
            api=self.api,
            settings=settings,
            store=CardStore(context.state_dir / "cards"),
            breaker=Breaker(settings.degrade_after, settings.degrade_for),
            log=self._log,
        )

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]  # depends on the settings
        cards = self.settings.reply_mode == "card"
        return Capabilities(
            edits=cards,
            streams=cards,
            feedback=cards,
            proactive=True,
            max_text_length=self.settings.max_text_length,
        )

    @classmethod
    def exclusive_key(cls, settings: FeishuSettings) -> str | None:
        return settings.app_id

    # -- connection ----------------------------------------------------------------------------

    async def serve(self) -> None:
        self._closing = False
        if not self._bot_open_id:
            self._bot_open_id = await self._bot_identity()
        url, ping_interval = await self._endpoint()
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        _mask_credentials(query)
        try:
            service = int(query.get("service_id", ["0"])[0])
        except ValueError:
            service = 0
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                ws = await self._session().ws_connect(
                    url, timeout=aiohttp.ClientWSTimeout(ws_close=1.0)
                )
        except aiohttp.WSServerHandshakeError as exc:
            raise _handshake_error(exc, self.context.instance, self.settings.app_id) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryableError(f"long connection failed: {type(exc).__name__}: {exc}") from exc
        self._ws = ws
        self.context.connected()
        self._ping_interval = ping_interval
        pinger = asyncio.get_running_loop().create_task(self._ping(ws, service))
        try:
            await self._read_frames(ws)
        finally:
            self._ws = None
            pinger.cancel()
            await ws.close()
            # After close() drained them, nothing is left; after a lost connection, ACKs cannot
            # be sent any more.
            await self._tasks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinger

    async def _bot_identity(self) -> str:
        """The bot's open_id, to tell whether a group message mentions *this* bot."""
        try:
            data = await self.api.call("GET", "/open-apis/bot/v3/info")
        except OpenApiError as exc:
            raise DriverConfigError(
                f"Feishu has no bot for app {self.settings.app_id} (instance "
                f"{self.context.instance}): enable the bot ability ({exc})"
            ) from exc
        bot = data.get("bot")
        open_id = bot.get("open_id") if isinstance(bot, dict) else None
        if not isinstance(open_id, str) or not open_id:
            raise RetryableError("Feishu answered /bot/v3/info without the bot's open_id")
        return open_id

    async def _endpoint(self) -> tuple[str, float]:
        """The websocket URL and the ping interval, from ``/callback/ws/endpoint``."""
        body = {"AppID": self.settings.app_id, "AppSecret": self.settings.app_secret.reveal()}
        status, data, _ = await self.api.exchange(
            "POST", _ENDPOINT_PATH, body, headers={"locale": "zh"}
        )
        if status == 404:
            raise DriverConfigError(
                f"{self.settings.base_url}{_ENDPOINT_PATH} does not exist: check the domain setting"
            )
        if status != 200 or not isinstance(data, dict):
            raise RetryableError(f"the long-connection endpoint answered HTTP {status}")
        code, msg = data.get("code"), str(data.get("msg", ""))
        if code == _AUTH_FAILED:
            raise AuthenticationError(
                f"Feishu rejected the app id/secret of instance {self.context.instance} "
                f"(app id {self.settings.app_id}: {code} {msg})"
            )
        if code == _CONNECTION_LIMIT:
            # 50 connections per app are open elsewhere: retrying soon cannot help, someone must
            # stop the other clients (another deployment, old replicas).  Retried at the slow pace.
            raise DriverConfigError(
                f"app {self.settings.app_id} has too many long connections open ({code} {msg})"
            )
        if code in (_SYSTEM_BUSY, _INTERNAL_ERROR):
            raise RetryableError(f"the long-connection endpoint is busy ({code} {msg})")
        if code != 0:
            raise DriverConfigError(
                f"the long-connection endpoint refused app {self.settings.app_id} ({code} {msg})"
            )
        payload = data.get("data") or {}
        url = payload.get("URL") if isinstance(payload, dict) else None
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise RetryableError("the long-connection endpoint answered without a websocket URL")
        config = payload.get("ClientConfig") or {}
        return url, _ping_interval(config, _DEFAULT_PING_INTERVAL)

    async def _ping(self, ws: aiohttp.ClientWebSocketResponse, service: int) -> None:
        """Ping at once and then every ping interval, but often enough that pongs come back well
        within ``frame_timeout`` (the one sign of life on a quiet connection)."""
        ping = Frame.ping(service).to_bytes()
        while not ws.closed:
            try:
                await ws.send_bytes(ping)
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                return  # the read loop sees the connection end
            await asyncio.sleep(min(self._ping_interval, self.settings.frame_timeout / 2))

    async def _read_frames(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        parts = _Parts(self._log)
        timeout = self.settings.frame_timeout
        async for msg in messages(ws, timeout=timeout, platform="Feishu", closing=self._is_closing):
            self.context.frame_received()
            if msg.type is aiohttp.WSMsgType.BINARY:
                self._on_frame(ws, msg.data, parts)
            # Text messages are not part of the protocol.

    def _is_closing(self) -> bool:
        return self._closing

    async def close(self) -> None:
        self._closing = True
        # ACKs of the events being stored go out before the socket closes (see the module doc).
        await self._tasks.drain()
        ws = self._ws
        if ws is not None:
            await ws.close()
        await self._tasks.cancel()
        await self._session.close()

    # -- frames --------------------------------------------------------------------------------

    def _on_frame(self, ws: aiohttp.ClientWebSocketResponse, data: bytes, parts: _Parts) -> None:
        try:
            frame = Frame.from_bytes(data)
        except FrameError as exc:
            self._log.warning("ignoring a malformed frame (%s)", exc, extra={"event": "bad_frame"})
            return
        if frame.method == CONTROL:
            if frame.type == "pong" and frame.payload:
                self._configure(frame.payload)
            return
        if frame.method != DATA:
            return
        payload = parts.add(frame)
        if payload is None:
            return
        self._tasks.spawn(self._on_data(ws, frame, payload))

    def _configure(self, payload: bytes) -> None:
        try:
            config = json.loads(payload)
        except (ValueError, RecursionError):
            self._log.info("ignoring an unreadable client config in a pong")
            return
        if isinstance(config, dict):
            self._ping_interval = _ping_interval(config, self._ping_interval)

    async def _on_data(
        self, ws: aiohttp.ClientWebSocketResponse, frame: Frame, payload: bytes
    ) -> None:
        started = time.monotonic()
        try:
            envelope = json.loads(payload)
            if not isinstance(envelope, dict):
                raise TypeError("the payload is not an object")
        except (ValueError, TypeError, RecursionError) as exc:
            self._log.warning(
                "acknowledging an unreadable payload (frame %s): %s",
                frame.header("message_id"),
                exc,
                extra={"event": "bad_message"},
            )
            await self._ack(ws, frame, started)
            return
        kind = event_type(envelope)
        if frame.type == "card" or kind == EVENT_CARD_ACTION:
            response = await self._on_card_action(envelope)
            await self._ack(ws, frame, started, response)
        elif kind == EVENT_MESSAGE:
            if await self._on_message(envelope):
                await self._ack(ws, frame, started)
        else:
            # An event the app subscribed to but the gateway does not handle, or no event at all:
            # say "done", as a re-push would be no more useful.
            if kind:
                self._log.debug("acknowledging an unhandled event %r", kind)
            else:
                self._log.warning(
                    "acknowledging a payload that is no event (frame %s)",
                    frame.header("message_id"),
                    extra={"event": "bad_message"},
                )
            await self._ack(ws, frame, started)

    async def _on_message(self, envelope: dict[str, Any]) -> bool:
        """Store one message; True if it may be ACKed (stored, a duplicate, unreadable or not for
        the bot), False if Feishu must push it again."""
        try:
            if not addressed_to_bot(envelope, self._bot_open_id):
                # A group message for others (apps with the "all group messages" scope get them).
                self._log.debug("ignoring a group message that does not mention the bot")
                return True
            message = incoming_from_feishu(self.context.instance, envelope, self._bot_open_id)
        except _UNREADABLE as exc:
            self._log.warning(
                "acknowledging an unreadable message event: %s: %s",
                type(exc).__name__,
                exc,
                extra={"event": "bad_message"},
            )
            return True
        try:
            await self.context.deliver(message)
        except ShuttingDown:
            return False  # not ACKed: Feishu pushes it again, to us after a restart or elsewhere
        except Exception:
            self._log.exception(
                "could not store message %s; not acknowledging it so Feishu pushes it again",
                message.message_id,
                extra={"message_id": message.message_id},
            )
            return False
        return True

    async def _on_card_action(self, envelope: dict[str, Any]) -> dict[str, Any] | None:
        """Record a feedback click; the toast that thanks the user, or None for other actions."""
        s = self.settings
        try:
            event = feedback_from_feishu(self.context.instance, envelope)
        except _UNREADABLE as exc:
            self._log.warning(
                "ignoring an unreadable card callback: %s: %s", type(exc).__name__, exc
            )
            return None
        if event is None:
            self._log.info("card action without a feedback rating ignored")
            return None
        try:
            async with asyncio.timeout(_FEEDBACK_BUDGET):
                await self.context.feedback(event)
        except Exception as exc:
            self._log.warning("recording feedback failed: %s: %s", type(exc).__name__, exc)
            return None
        labels = dict(zip(s.feedback_values, s.feedback_labels, strict=True))
        thanks = s.feedback_thanks.replace("{label}", labels.get(event.rating, event.rating))
        return {"toast": {"type": "success", "content": thanks}}

    async def _ack(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        frame: Frame,
        started: float,
        response: dict[str, Any] | None = None,
    ) -> None:
        elapsed = int((time.monotonic() - started) * 1000)
        try:
            await ws.send_bytes(frame.ack(200, biz_rt_ms=elapsed, response=response).to_bytes())
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            # The socket is gone; Feishu re-pushes and the inbox recognises the message.
            self._log.info(
                "acknowledgement of frame %s not sent: %s", frame.header("message_id"), exc
            )

    # -- replies -------------------------------------------------------------------------------

    def open_reply(self, message: Incoming) -> ReplyChannel:
        if self.settings.reply_mode == "card":
            return CardReply(self._tools, message)
        return MessageReply(self._tools, message)

    async def send(self, message: Outgoing) -> str:
        id_type = "chat_id" if message.target is TargetKind.CONVERSATION else "open_id"
        msg_type, content = message_content(
            message.text, markdown=message.markdown, title=message.title
        )
        body = {"receive_id": message.to, "msg_type": msg_type, "content": content}
        if message.idempotency_key:
            body["uuid"] = send_uuid(f"{message.instance}\x00{message.idempotency_key}")
        try:
            data = await self.api.call(
                "POST", "/open-apis/im/v1/messages", body, params={"receive_id_type": id_type}
            )
        except OpenApiError as exc:
            raise SendRejected(str(exc)) from exc
        return str(data.get("message_id", ""))


class _Parts:
    """Payloads split over several DATA frames (``sum`` > 1), put together by ``message_id``.

    Bounded, as the headers are the server's word: at most ``_MAX_PARTS`` parts and
    ``_MAX_PAYLOAD`` bytes a payload, ``_MAX_INCOMPLETE`` payloads and ``_MAX_PENDING`` bytes
    waiting in all; a frame beyond them is logged and dropped (so the event is not ACKed, and
    Feishu pushes it again)."""

    def __init__(self, log: logging.LoggerAdapter[logging.Logger]) -> None:
        self._log = log
        self._pending: dict[str, tuple[float, list[bytes | None]]] = {}
        self._bytes = 0  # held in _pending

    def add(self, frame: Frame) -> bytes | None:
        """The whole payload once every part arrived (at once for a single frame), else None."""
        try:
            total, index = int(frame.header("sum") or 1), int(frame.header("seq") or 0)
        except ValueError:
            total, index = 1, 0
        if total <= 1:
            return frame.payload
        key = frame.header("message_id") or ""
        if total > _MAX_PARTS:
            self._drop(key, f"it claims {total} parts (at most {_MAX_PARTS} are taken)")
            return None
        now = time.monotonic()
        for stale in [k for k, (t, _) in self._pending.items() if now - t >= _PARTS_TTL]:
            self._forget(stale)
        if key not in self._pending and len(self._pending) >= _MAX_INCOMPLETE:
            self._drop(key, f"{_MAX_INCOMPLETE} payloads are waiting for parts already")
            return None
        _, chunks = self._pending.setdefault(key, (now, [None] * total))
        if len(chunks) != total or not 0 <= index < total or chunks[index] is not None:
            return None
        size = len(frame.payload)
        held = sum(len(c) for c in chunks if c is not None)
        if held + size > _MAX_PAYLOAD:
            self._forget(key)
            self._drop(key, f"its parts exceed {_MAX_PAYLOAD} bytes")
            return None
        if self._bytes + size > _MAX_PENDING:
            self._drop(key, f"incomplete payloads would hold over {_MAX_PENDING} bytes")
            return None
        chunks[index] = frame.payload
        self._bytes += size
        if any(chunk is None for chunk in chunks):
            return None
        self._forget(key)
        return b"".join(chunk or b"" for chunk in chunks)

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def _forget(self, key: str) -> None:
        _, chunks = self._pending.pop(key, (0.0, []))
        self._bytes -= sum(len(c) for c in chunks if c is not None)

    def _drop(self, key: str, why: str) -> None:
        self._log.warning(
            "dropping a part of payload %s: %s", key, why, extra={"event": "bad_frame"}
        )


def _mask_credentials(query: Mapping[str, list[str]]) -> None:
    """Register the credentials in the websocket URL with the log redactor (see ``url_secret``)."""
    for name, values in query.items():
        if any(word in name.lower() for word in _CREDENTIAL_PARAM):
            for value in values:
                url_secret(value)  # the URL may show it percent-encoded


def _ping_interval(config: Any, default: float) -> float:
    value = config.get("PingInterval") if isinstance(config, dict) else None
    return float(value) if isinstance(value, int | float) and value > 0 else default


def _handshake_error(exc: aiohttp.WSServerHandshakeError, instance: str, app_id: str) -> Exception:
    """Feishu explains a refused upgrade in headers (lark-oapi ``_parse_ws_conn_exception``)."""
    headers: Mapping[str, str] = exc.headers or {}
    status, auth = headers.get("handshake-status", ""), headers.get("handshake-autherrcode", "")
    message = headers.get("handshake-msg", "")
    if status == str(_AUTH_FAILED) and auth == str(_CONNECTION_LIMIT):
        return DriverConfigError(f"app {app_id} has too many long connections open ({message})")
    if status == "403":
        return AuthenticationError(
            f"Feishu refused the long connection of instance {instance} (app id {app_id}: {message})"
        )
    return RetryableError(
        f"long-connection handshake refused: HTTP {exc.status} {status} {message}"
    )
