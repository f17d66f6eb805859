"""``DingTalkEmulator``: one aiohttp server on loopback playing DingTalk's Stream gateway and OpenAPI."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from aiohttp import web

from gateway.emulation import Call as _Call
from gateway.emulation import LoopbackServer, count_calls, read_json
from gateway_dingtalk.emulator._cards import CardApi
from gateway_dingtalk.emulator._faults import (
    QPS_LIMIT_CODE,
    QPS_LIMIT_MESSAGE,
    ApiError,
    FaultPlan,
    QpsWindow,
    default_error,
)
from gateway_dingtalk.emulator._openapi import OpenApi
from gateway_dingtalk.emulator._payloads import (
    BOT_TOPIC,
    CARD_TOPIC,
    MSGTYPES,
    TINY_PNG,
    conversation_id,
    dumps,
    encrypted_id,
    message_content,
    new_msg_id,
    now_ms,
    unified_app_id,
)
from gateway_dingtalk.emulator._records import (
    AckRecord,
    CallRecord,
    CardClick,
    CardState,
    ConcurrentCardUpdate,
    Conversation,
    Distribution,
    EmulatorError,
    PingRecord,
    SentMessage,
    SentReply,
    StreamConnection,
    Violation,
)
from gateway_dingtalk.emulator._stream import StreamGateway, _Outbound, _Push

__all__ = ["DEFAULT_APP", "DEFAULT_SECRET", "DingTalkEmulator"]

DEFAULT_APP = "ding-app-id"
DEFAULT_SECRET = "ding-app-secret"

_Handler = Callable[["_Call"], Awaitable[Any]]

# Where multi-media types are delivered: audio, video and file only reach bots in 1:1 chats.
_ONE_TO_ONE_ONLY = ("audio", "video", "file")


def _json_response(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=dumps)


class DingTalkEmulator(LoopbackServer):
    """DingTalk's server side for tests: Stream gateway, OpenAPI, session webhooks, card state.

    Bound to ``host`` (loopback) on ``port`` (0: any free port).  Everything a test may flip at run
    time is a plain attribute: ``latency``, ``card_latency``, ``qps_limit``, ``distribution``,
    ``refuse_connections``, ``ignore_ws_pings``, ``ack_timeout``, ``max_redeliveries``,
    ``ping_interval``, ``templates``...
    """

    error = EmulatorError

    def __init__(
        self,
        apps: Mapping[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ping_interval: float | None = None,
        ack_timeout: float | None = 10.0,
        max_redeliveries: int = 2,
        redeliver_new_frame_id: bool = True,
        token_ttl: float = 7200.0,
        ticket_ttl: float = 90.0,
        qps_limit: float | None = None,
        distribution: Distribution = "random",
        templates: Mapping[str, Iterable[str]] | None = None,
        robot_code_for: Mapping[str, str] | None = None,
        max_stream_content_bytes: int | None = None,
        max_param_value_bytes: int | None = None,
        expired_token_status: int = 400,
        strict_card_concurrency: bool = False,
        card_callback_limit: float = 2.0,
        disconnect_close_after: float = 10.0,
        require_json_accept: bool = True,
        corp_id: str = "dingemulatorcorp",
        seed: int | None = None,
    ) -> None:
        if distribution not in ("random", "newest", "reject"):
            raise ValueError(f"unknown distribution {distribution!r}")
        super().__init__(host, port)
        self.apps: dict[str, str] = dict(
            apps if apps is not None else {DEFAULT_APP: DEFAULT_SECRET}
        )
        if not self.apps:
            raise ValueError("at least one app is required")
        # -- settings (all may be changed while running) --
        self.ping_interval = ping_interval
        self.ack_timeout = ack_timeout
        self.max_redeliveries = max_redeliveries
        self.redeliver_new_frame_id = redeliver_new_frame_id
        self.token_ttl = token_ttl
        self.ticket_ttl = ticket_ttl
        self.qps_limit = qps_limit
        self.distribution: Distribution = distribution
        self.templates: dict[str, frozenset[str]] = {
            key: frozenset(variables) for key, variables in (templates or {}).items()
        }
        self.robot_code_for: dict[str, str] = dict(robot_code_for or {})
        self.max_stream_content_bytes = max_stream_content_bytes
        self.max_param_value_bytes = max_param_value_bytes
        self.expired_token_status = expired_token_status
        self.strict_card_concurrency = strict_card_concurrency
        self.card_callback_limit = card_callback_limit
        self.disconnect_close_after = disconnect_close_after
        self.require_json_accept = require_json_accept
        self.corp_id = corp_id
        # -- faults --
        self.latency = 0.0
        self.card_latency = 0.0
        self.refuse_connections = False
        self.ignore_ws_pings = False
        # -- observations --
        self.cards: dict[str, CardState] = {}
        self.sent: list[SentReply] = []
        self.calls: list[CallRecord] = []
        self.violations: list[Violation] = []
        self.card_clicks: list[CardClick] = []
        self.concurrent_card_updates: list[ConcurrentCardUpdate] = []
        #: QPS rejections by epoch second
        self.rejections: collections.Counter[int] = collections.Counter()
        #: every frame pushed: (connection id, frame)
        self.frames: list[tuple[str, dict[str, Any]]] = []
        self.conversations: dict[str, Conversation] = {}
        #: staff ids known per app (users who talked to the bot)
        self.users: dict[str, set[str]] = {}
        # -- machinery --
        self._rng = random.Random(seed)
        self._faults = FaultPlan()
        self._qps = QpsWindow()
        self._stream = StreamGateway(self)
        self._openapi = OpenApi(self)
        self._cards = CardApi(self)
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    # ``url`` is the OpenAPI endpoint (``DINGTALK_OPENAPI_ENDPOINT``).

    @property
    def ws_url(self) -> str:
        """The websocket endpoint ``connections/open`` hands out."""
        return "ws" + self.url[len("http") :] + "/connect"

    async def _shut_down(self) -> None:
        """Close every socket (with a close frame, aborting after 1 s)."""
        for outbound in self._stream.outbound.values():
            if outbound.task is not None:
                outbound.task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self._stream.close_connections(
            self._stream.live_of(), code=1001, message="emulator closing", closed_by="server"
        )
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _routes(self) -> list[web.RouteDef]:
        stream, api, cards = self._stream, self._openapi, self._cards

        def serve(handler: _Handler, *, auth: bool = True, robot: bool = False) -> Any:
            async def route(request: web.Request) -> web.StreamResponse:
                return await self._serve(request, handler, auth=auth, robot=robot)

            return route

        async def not_found(call: _Call) -> Any:
            raise ApiError(
                404, "InvalidAction.NotFound", f"Specified api is not found: {call.path}"
            )

        return [
            web.post("/v1.0/gateway/connections/open", serve(stream.open_connection, auth=False)),
            web.get("/connect", stream.connect),
            web.post("/v1.0/oauth2/accessToken", serve(api.access_token, auth=False)),
            web.post("/v1.0/card/instances/createAndDeliver", serve(cards.create_and_deliver)),
            web.post("/v1.0/card/instances/deliver", serve(cards.deliver)),
            web.post("/v1.0/card/instances", serve(cards.create)),
            web.put("/v1.0/card/instances", serve(cards.update)),
            web.put("/v1.0/card/streaming", serve(cards.streaming)),
            web.post("/v1.0/im/v1.0/robot/interactiveCards/send", serve(cards.legacy_send)),
            web.put("/v1.0/im/robots/interactiveCards", serve(cards.legacy_update)),
            web.post("/robot/sendBySession", serve(api.send_by_session, auth=False, robot=True)),
            web.post("/v1.0/robot/groupMessages/send", serve(api.group_send)),
            web.post("/v1.0/robot/oToMessages/batchSend", serve(api.batch_send)),
            web.post("/v1.0/robot/messageFiles/download", serve(api.download)),
            web.get("/files/{token}", serve(api.serve_file, auth=False)),
            web.route("*", "/{tail:.*}", serve(not_found, auth=False)),
        ]

    # -- HTTP plumbing ------------------------------------------------------------------------------

    async def _serve(
        self, request: web.Request, handler: _Handler, *, auth: bool, robot: bool
    ) -> web.StreamResponse:
        started = time.monotonic()
        path = request.path
        body, parsed = await read_json(request)
        parse_error = (
            None
            if parsed
            else ApiError(400, "InvalidParameter.JsonFormat", "the body is not valid JSON")
        )
        call = _Call(request, path, body)
        try:
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            fault = self._faults.take(path)
            if fault is not None:
                raise ApiError(fault.status, fault.code, fault.message)
            if auth:
                call.app = self._openapi.authenticate(request)
                limit = self.qps_limit
                if limit is not None and not self._qps.admit(call.app, path, limit):
                    self.rejections[int(time.time())] += 1
                    raise ApiError(403, QPS_LIMIT_CODE, QPS_LIMIT_MESSAGE)
            if parse_error is not None:
                raise parse_error
            result = await handler(call)
        except ApiError as error:
            if robot:
                errcode = int(error.code) if error.code.isdigit() else -1
                answer: Any = {"errcode": errcode, "errmsg": error.message}
            else:
                answer = error.body()
            self._record_call(
                request.method, path, error.status, error, call.app, started, body, answer
            )
            return _json_response(answer, error.status)
        if isinstance(result, web.StreamResponse):
            self._record_call(request.method, path, result.status, None, call.app, started, body)
            return result
        code = ""
        if robot and isinstance(result, dict) and result.get("errcode"):
            code = str(result["errcode"])
        self._record_call(request.method, path, 200, None, call.app, started, body, result, code)
        return _json_response(result)

    def _record_call(
        self,
        method: str,
        path: str,
        status: int,
        error: ApiError | None,
        app: str | None,
        started: float,
        body: Any = None,
        response: Any = None,
        code: str = "",
    ) -> None:
        code = error.code if error is not None else code
        self.calls.append(CallRecord(method, path, status, code, app, started, body, response))
        self._notify()

    # -- configuration helpers ------------------------------------------------------------------------

    @property
    def default_app(self) -> str:
        return next(iter(self.apps))

    def robot_code(self, app: str | None = None) -> str:
        """The robot code of ``app`` (its clientId unless ``robot_code_for`` says otherwise)."""
        app = app or self.default_app
        return self.robot_code_for.get(app, app)

    def add_template(self, template_id: str, variables: Iterable[str]) -> None:
        self.templates[template_id] = frozenset(variables)

    def add_conversation(
        self,
        conversation_id: str,
        *,
        app: str | None = None,
        conversation_type: str = "2",
        title: str = "",
        members: Iterable[str] = (),
    ) -> Conversation:
        """Make a conversation known (as if the bot were in it), without sending a message."""
        app = app or self.default_app
        conversation = self.conversations.get(conversation_id)
        if conversation is None:
            conversation = Conversation(conversation_id, app, conversation_type, title)
            self.conversations[conversation_id] = conversation
        conversation.members.update(members)
        for member in members:
            self.add_user(member, app=app)
        return conversation

    def add_user(self, staff_id: str, *, app: str | None = None) -> None:
        self.users.setdefault(app or self.default_app, set()).add(staff_id)

    def single_conversation(self, app: str, staff_id: str) -> str:
        """The 1:1 conversation id between ``staff_id`` and the bot of ``app``."""
        return conversation_id(app, "single", staff_id)

    def add_file(
        self,
        content: bytes,
        *,
        app: str | None = None,
        file_name: str = "file.bin",
        content_type: str = "application/octet-stream",
    ) -> str:
        """Store bytes the bot may download; returns the ``downloadCode``."""
        return self._openapi.add_file(
            app or self.default_app, content, file_name, content_type
        ).code

    # -- robot messages ------------------------------------------------------------------------------

    def message(
        self,
        app: str | None = None,
        text: str = "hi",
        *,
        conversation_type: str = "1",
        conversation_id: str | None = None,
        conversation_title: str | None = None,
        sender_staff_id: str = "user1",
        sender_nick: str = "User One",
        msgtype: str = "text",
        content: Mapping[str, Any] | None = None,
        msg_id: str | None = None,
        at_bot: bool = True,
        at_users: Sequence[str] = (),
        is_admin: bool = False,
        session_webhook_ttl: float = 5400.0,
        attachment: bytes | None = None,
        file_name: str | None = None,
        quota_exceeded: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Build the ``data`` of a robot message (research doc §2) and register what it implies on
        the platform: the conversation, the sender, a session webhook, download codes.

        ``quota_exceeded`` gives what DingTalk pushes once the monthly push quota is used up:
        ``errCode``/``errMsg`` and no ``text``/``content``.  ``extra`` is merged into the payload."""
        app = app or self.default_app
        if app not in self.apps:
            raise EmulatorError(f"unknown app {app!r}")
        if conversation_type not in ("1", "2"):
            raise ValueError('conversation_type is "1" (1:1) or "2" (group)')
        if msgtype not in MSGTYPES:
            raise ValueError(f"msgtype must be one of {MSGTYPES}")
        group = conversation_type == "2"
        if conversation_id is None:
            conversation_id = (
                self.single_conversation(app, sender_staff_id) if not group else _default_group(app)
            )
        title = conversation_title if conversation_title is not None else "Emulator Group"
        conversation = self.add_conversation(
            conversation_id,
            app=app,
            conversation_type=conversation_type,
            title=title if group else "",
        )
        if sender_staff_id:
            conversation.members.add(sender_staff_id)
            self.add_user(sender_staff_id, app=app)
        msg_id = msg_id or new_msg_id()
        create_at = now_ms()
        session = self._openapi.issue_session(
            app, conversation_id, conversation_type, sender_staff_id, msg_id, session_webhook_ttl
        )
        bot_id = encrypted_id("bot", app)
        data: dict[str, Any] = {"conversationId": conversation_id}
        if group:
            data["atUsers"] = [{"dingtalkId": bot_id}] if at_bot else []
            data["atUsers"] += [
                {"dingtalkId": encrypted_id("user", user), "staffId": user} for user in at_users
            ]
        data.update(
            {
                "chatbotCorpId": self.corp_id,
                "chatbotUserId": bot_id,
                "msgId": msg_id,
                "senderNick": sender_nick,
                "isAdmin": is_admin,
                "senderStaffId": sender_staff_id,
                "sessionWebhookExpiredTime": session.expires_ms,
                "createAt": create_at,
                "senderCorpId": self.corp_id,
                "conversationType": conversation_type,
                "senderId": encrypted_id("user", sender_staff_id or sender_nick),
            }
        )
        if group:
            data["isInAtList"] = at_bot
            data["conversationTitle"] = title
        data["sessionWebhook"] = f"{self.url}/robot/sendBySession?session={session.token}"
        if msgtype == "text":
            data["text"] = {"content": (" " + text) if group and at_bot else text}
        elif content is not None:
            data["content"] = dict(content)
        else:
            codes: list[str] = []
            if msgtype != "unknownMsgType":
                payload = attachment if attachment is not None else TINY_PNG
                media = "image/png" if attachment is None else "application/octet-stream"
                name = file_name or ("image.png" if attachment is None else "file.bin")
                codes.append(self.add_file(payload, app=app, file_name=name, content_type=media))
            data["content"] = message_content(msgtype, text, codes, file_name)
        data["robotCode"] = self.robot_code(app)
        data["msgtype"] = msgtype
        if quota_exceeded:
            data.pop("text", None)
            data.pop("content", None)
            data["errCode"] = 20001
            data["errMsg"] = "受调用量超量影响，当前我的消息服务已经暂停，请联系管理员升级套餐"
        data.update(extra or {})
        return data

    async def send_message(
        self,
        app: str | None = None,
        text: str = "hi",
        *,
        connection: str | StreamConnection | None = None,
        wait_connection: float = 5.0,
        redeliver: bool = True,
        **payload: Any,
    ) -> SentMessage:
        """Push a robot message built by :meth:`message` (``payload`` are its keyword arguments) on
        ``/v1.0/im/bot/messages/get`` to one live connection of ``app`` (waiting up to
        ``wait_connection`` s for one).  Unacked, it is redelivered after ``ack_timeout`` up to
        ``max_redeliveries`` times.  A group message that does not @ the bot, and audio/video/file
        in groups, are not delivered (``SentMessage.delivered`` is False)."""
        app = app or self.default_app
        data = self.message(app, text, **payload)
        group = payload.get("conversation_type", "1") == "2"
        msgtype = payload.get("msgtype", "text")
        if group and (not payload.get("at_bot", True) or msgtype in _ONE_TO_ONE_ONLY):
            return SentMessage(data["msgId"], "", "", data, delivered=False)
        return await self.push_data(
            app,
            data,
            key=data["msgId"],
            connection=connection,
            wait_connection=wait_connection,
            redeliver=redeliver,
        )

    async def push_data(
        self,
        app: str | None,
        data: Mapping[str, Any] | str,
        *,
        key: str,
        frame_type: str = "CALLBACK",
        topic: str = BOT_TOPIC,
        extra_headers: Mapping[str, str] | None = None,
        connection: str | StreamConnection | None = None,
        wait_connection: float = 5.0,
        redeliver: bool = True,
    ) -> SentMessage:
        """Push ``data`` (a payload, e.g. from :meth:`message`) as a tracked message keyed ``key``."""
        app = app or self.default_app
        text = data if isinstance(data, str) else dumps(dict(data))
        live = await self._stream.wait_candidate(
            app, frame_type, topic, connection, wait_connection
        )
        kind = {"CALLBACK": "card" if topic == CARD_TOPIC else "message", "EVENT": "event"}.get(
            frame_type, "raw"
        )
        outbound = _Outbound(key, app, frame_type, topic, text, kind, dict(extra_headers or {}))
        push = await self._stream.send(outbound, live, redeliver=redeliver and kind != "card")
        parsed = data if not isinstance(data, str) else json.loads(data)
        return SentMessage(key, push.frame_id, live.conn.id, dict(parsed))

    async def send_event(
        self,
        app: str | None = None,
        event_type: str = "chat_update_title",
        data: Mapping[str, Any] | None = None,
        *,
        event_id: str | None = None,
        topic: str = "*",
        connection: str | StreamConnection | None = None,
        wait_connection: float = 5.0,
        redeliver: bool = True,
    ) -> SentMessage:
        """Push an EVENT frame (to connections subscribed to ``EVENT *``); ``msg_id`` is the eventId."""
        app = app or self.default_app
        event_id = event_id or new_msg_id()[3:]
        headers = {
            "eventType": event_type,
            "eventId": event_id,
            "eventCorpId": self.corp_id,
            "eventBornTime": str(now_ms()),
            "eventUnifiedAppId": unified_app_id(app),
        }
        payload = dict(data) if data is not None else {"timestamp": str(now_ms())}
        return await self.push_data(
            app,
            payload,
            key=event_id,
            frame_type="EVENT",
            topic=topic,
            extra_headers=headers,
            connection=connection,
            wait_connection=wait_connection,
            redeliver=redeliver,
        )

    async def push_frame(
        self,
        app: str | None,
        frame: Mapping[str, Any] | str,
        connection: str | StreamConnection | None = None,
    ) -> str:
        """Send a raw frame (a dict, or any string for malformed input) to ``connection`` or to a
        live connection of ``app``; acks for its ``headers.messageId`` are matched.  Returns the
        connection id."""
        app = app or self.default_app
        if connection is not None:
            live = self._stream.resolve(connection)
        else:
            chosen = self._stream.choose(
                [c for c in self._stream.live_of(app) if not c.conn.draining]
            )
            if chosen is None:
                raise EmulatorError(f"no live connection of {app}")
            live = chosen
        text = frame if isinstance(frame, str) else _frame_text(dict(frame))
        if isinstance(frame, Mapping):
            headers = frame.get("headers")
            if isinstance(headers, Mapping) and headers.get("messageId"):
                frame_id = str(headers["messageId"])
                push = _Push(
                    frame_id,
                    live.conn.id,
                    str(frame.get("type", "")),
                    str(headers.get("topic", "")),
                    "raw",
                    time.monotonic(),
                )
                self._stream.pushes.setdefault(frame_id, []).append(push)
            self.frames.append((live.conn.id, dict(frame)))
        try:
            await live.ws.send_str(text)
        except (ConnectionError, RuntimeError) as exc:
            raise EmulatorError(f"connection {live.conn.id} went away: {exc}") from exc
        return live.conn.id

    async def redeliver(
        self, msg_id: str, *, connection: str | StreamConnection | None = None
    ) -> SentMessage:
        """Push message ``msg_id`` again now (same data; a new frame id unless
        ``redeliver_new_frame_id`` is False), as DingTalk does when it missed the ack."""
        outbound = self._stream.outbound.get(msg_id)
        if outbound is None:
            raise EmulatorError(f"unknown message {msg_id!r}")
        live = await self._stream.wait_candidate(
            outbound.app, outbound.frame_type, outbound.topic, connection, 5.0
        )
        push = await self._stream.deliver(outbound, live)
        return SentMessage(msg_id, push.frame_id, live.conn.id, json.loads(outbound.data))

    async def wait_acked(self, key: str, timeout: float = 5.0) -> AckRecord:
        """The ack of message ``key`` (a msgId / eventId: the first ack with code 200) or of frame
        ``key`` (a ``headers.messageId``: its first ack on the right connection, any code).
        ``TimeoutError`` if none arrives in time."""
        stream = self._stream

        def found() -> AckRecord | None:
            outbound = stream.outbound.get(key)
            if outbound is not None:
                return outbound.ack
            for push in stream.pushes.get(key, ()):
                if push.ack is not None:
                    return push.ack
            return None

        await self._wait_for(lambda: found() is not None, timeout)
        result = found()
        assert result is not None
        return result

    def deliveries(self, msg_id: str) -> int:
        """How many times message ``msg_id`` was pushed (first delivery and redeliveries)."""
        return self._stream.delivery_counts.get(msg_id, 0)

    def acked(self, msg_id: str) -> bool:
        outbound = self._stream.outbound.get(msg_id)
        return outbound is not None and outbound.ack is not None

    @property
    def acks(self) -> list[AckRecord]:
        """Every ack that counted (right connection, first ack of its frame), SYSTEM ones included."""
        return self._stream.acks

    @property
    def misrouted_acks(self) -> list[AckRecord]:
        """Acks that came on another connection than the one that delivered the frame."""
        return self._stream.misrouted_acks

    @property
    def undeliverable(self) -> list[str]:
        """Keys of messages whose redelivery found no live subscribed connection."""
        return self._stream.undeliverable

    # -- card callbacks ----------------------------------------------------------------------------

    async def click_card(
        self,
        app: str | None,
        out_track_id: str,
        user_id: str,
        params: Mapping[str, Any] | None = None,
        action_ids: Sequence[str] = (),
        timeout: float = 2.0,
        *,
        require_card: bool = True,
        connection: str | StreamConnection | None = None,
        wait_connection: float = 5.0,
    ) -> Any:
        """A user clicks a button of card ``out_track_id``: push the ``actionCallback`` CALLBACK,
        wait up to ``timeout`` s for the ack, apply the card update it carries, and return the
        ack's ``response`` (None if no ack came)."""
        app = app or self.default_app
        card = self.cards.get(out_track_id)
        if require_card:
            if card is None or card.app != app:
                raise EmulatorError(f"no card {out_track_id!r} of {app}")
            if card.legacy or card.callback_type != "STREAM":
                raise EmulatorError(
                    f"card {out_track_id!r} was not created with callbackType STREAM: "
                    "DingTalk would not send its clicks over Stream"
                )
        space = (card.space or "") if card is not None else ""
        space_type, _, space_id = space.removeprefix("dtv1.card//").partition(".")
        content = {"cardPrivateData": {"actionIds": list(action_ids), "params": dict(params or {})}}
        data = {
            "extension": "{}",
            "corpId": self.corp_id,
            "spaceType": space_type,
            "userIdType": 1,
            "type": "actionCallback",
            "userId": user_id,
            "content": dumps(content),
            "spaceId": space_id,
            "outTrackId": out_track_id,
        }
        sent = await self.push_data(
            app,
            data,
            key=out_track_id,
            topic=CARD_TOPIC,
            connection=connection,
            wait_connection=wait_connection,
            redeliver=False,
        )
        started = time.monotonic()
        ack: AckRecord | None = None
        with contextlib.suppress(TimeoutError):
            ack = await self.wait_acked(sent.frame_id, timeout)
        response: Any = None
        applied = False
        if ack is not None:
            response = ack.data.get("response") if isinstance(ack.data, dict) else ack.data
            if ack.code == 200 and card is not None:
                applied = self._cards.apply_callback_response(card, user_id, response)
        self.card_clicks.append(
            CardClick(
                out_track_id=out_track_id,
                user_id=user_id,
                params=dict(params or {}),
                action_ids=list(action_ids),
                frame_id=sent.frame_id,
                connection_id=sent.connection_id,
                sent_at=started,
                acked_at=ack.time if ack else None,
                within_limit=ack is not None and ack.latency <= self.card_callback_limit,
                response=response,
                applied=applied,
            )
        )
        return response

    # -- connections -------------------------------------------------------------------------------

    @property
    def connections(self) -> list[StreamConnection]:
        """Live websocket connections, oldest first."""
        return [live.conn for live in self._stream.live_of()]

    @property
    def connection_history(self) -> list[StreamConnection]:
        """Every websocket connection ever accepted, closed ones included."""
        return list(self._stream.history)

    @property
    def connection_opens(self) -> int:
        """Successful ``connections/open`` calls (tickets issued)."""
        return self._stream.connection_opens

    async def wait_connected(
        self, app: str | None = None, count: int = 1, timeout: float = 5.0
    ) -> list[StreamConnection]:
        """Wait until ``app`` (any app if None) has ``count`` live, non-draining connections."""

        def ready() -> list[StreamConnection]:
            return [live.conn for live in self._stream.live_of(app) if not live.conn.draining]

        await self._wait_for(lambda: len(ready()) >= count, timeout)
        return ready()

    async def wait_connection_opens(self, count: int, timeout: float = 5.0) -> None:
        await self._wait_for(lambda: self.connection_opens >= count, timeout)

    def _targets(self, app: str | None, connection: str | StreamConnection | None) -> list[Any]:
        if connection is not None:
            return [self._stream.resolve(connection)]
        return self._stream.live_of(app)

    async def send_ping(
        self, app: str | None = None, connection: str | StreamConnection | None = None
    ) -> list[PingRecord]:
        """Send a ``SYSTEM/ping`` now to every live connection of ``app`` (or to ``connection``)."""
        return [await self._stream.send_ping(live) for live in self._targets(app, connection)]

    @property
    def pings(self) -> list[PingRecord]:
        return self._stream.pings

    @property
    def ping_mismatches(self) -> list[PingRecord]:
        """Pings acked without echoing their ``opaque``."""
        return [p for p in self._stream.pings if p.acked_at is not None and not p.ok]

    def stop_pings(self) -> None:
        """Half-open simulation: no more ``SYSTEM/ping`` frames and no Pong for websocket Pings."""
        self._stream.pings_paused = True
        self.ignore_ws_pings = True

    def resume_pings(self) -> None:
        self._stream.pings_paused = False
        self.ignore_ws_pings = False

    async def send_disconnect(
        self,
        app: str | None = None,
        reason: str = "persistent connection is timeout",
        close_after: float | None = None,
        *,
        connection: str | StreamConnection | None = None,
    ) -> list[str]:
        """Send ``SYSTEM/disconnect``; stop routing pushes to those connections; abort the TCP
        connection ``close_after`` s later (default ``disconnect_close_after``, 10 s) unless the
        client closed first.  Returns the connection ids."""
        delay = self.disconnect_close_after if close_after is None else close_after
        targets = self._targets(app, connection)
        for live in targets:
            await self._stream.send_disconnect(live, reason, delay)
        return [live.conn.id for live in targets]

    async def drop_connections(self, app: str | None = None) -> int:
        """Abort the TCP connections (no close frame), as a network failure would."""
        targets = self._stream.live_of(app)
        for live in targets:
            live.conn.closed_by = "dropped"
            self._stream.abort(live)
        await self._stream.wait_gone(targets)
        return len(targets)

    async def close_connections(
        self, app: str | None = None, code: int = 1000, message: str = ""
    ) -> int:
        """Close the connections with a close frame carrying ``code`` (e.g. 1011)."""
        targets = self._stream.live_of(app)
        await self._stream.close_connections(
            targets, code=code, message=message, closed_by="server"
        )
        return len(targets)

    # -- OpenAPI observation and faults -------------------------------------------------------------

    def fail_next(
        self,
        path_prefix: str = "",
        *,
        count: int = 1,
        status: int = 500,
        code: str | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next ``count`` HTTP requests whose path starts with ``path_prefix`` with an
        error.  ``code``/``message`` default by status: 500 unknownError, 403
        Forbidden.AccessDenied.QpsLimitForAppkeyAndApi, 400 InvalidAuthentication, 401
        Unauthorized, 429 system.busy, 503 ServiceUnavailable.  On the session webhook the answer
        is ``{"errcode": int(code), "errmsg": message}`` (use ``status=200, code="410100"``)."""
        default_code, default_message = default_error(status)
        self._faults.add(
            path_prefix,
            count,
            status,
            code if code is not None else default_code,
            message if message is not None else default_message,
        )

    def clear_faults(self) -> None:
        self._faults.clear()

    def count(self, path_prefix: str, status: int | None = None, method: str | None = None) -> int:
        """How many HTTP calls matched ``path_prefix`` (and ``status``/``method`` if given)."""
        return count_calls(self.calls, path_prefix, status, method)

    def expire_tokens(self) -> None:
        """Invalidate every access token now: the next call with one gets InvalidAuthentication."""
        self._openapi.expire_tokens()

    def expire_sessions(self) -> None:
        """Expire every session webhook now."""
        self._openapi.expire_sessions()

    def replies(self, msg_id: str) -> list[SentReply]:
        """What the bot sent through the session webhook of message ``msg_id``."""
        return [reply for reply in self.sent if reply.in_reply_to == msg_id]


def _frame_text(frame: dict[str, Any]) -> str:
    """A frame as DingTalk writes it (UTF-8, non-ASCII as is).  A lone surrogate (hostile-input
    tests) has no UTF-8 form: that frame travels with ``\\u`` escapes, as any JSON encoder may
    write it, instead of failing to send."""
    text = dumps(frame)
    try:
        text.encode()
    except UnicodeEncodeError:
        return json.dumps(frame)
    return text


def _default_group(app: str) -> str:
    return conversation_id(app, "group", "default")
