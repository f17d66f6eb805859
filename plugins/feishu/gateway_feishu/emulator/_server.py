"""``FeishuEmulator``: one aiohttp server on loopback playing Feishu's long connection and OpenAPI."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

from gateway.emulation import Call as _Call
from gateway.emulation import LoopbackServer, count_calls, read_json
from gateway_feishu.emulator._cardkit import CardKit
from gateway_feishu.emulator._faults import ApiError, Fault, FaultPlan, RateWindow, log_id
from gateway_feishu.emulator._longconn import ENDPOINT_PATH, WS_PATH, LongConnection
from gateway_feishu.emulator._openapi import MessageApi, TokenApi
from gateway_feishu.emulator._payloads import (
    User,
    card_action_event,
    chat_id_for,
    dumps,
    message_event,
    new_event_id,
    new_message_id,
)
from gateway_feishu.emulator._records import (
    AckRecord,
    CallRecord,
    CardClick,
    CardState,
    Chat,
    Delivery,
    EmulatorError,
    PingRecord,
    Rejection,
    SentMessage,
    Violation,
    WsConnection,
)

__all__ = ["DEFAULT_APP", "DEFAULT_SECRET", "FeishuEmulator"]

DEFAULT_APP = "cli_a0emulator00001"
DEFAULT_SECRET = "emulator-app-secret"

_Handler = Callable[["_Call"], Awaitable[Any]]

#: what ``fail_next`` answers for a status when no code is given
_DEFAULT_FAULTS: dict[int, tuple[int, str]] = {
    400: (
        99991663,
        "Invalid access token for authorization. Please make a request with token attached.",
    ),
    429: (99991400, "request trigger frequency limit"),
}


class FeishuEmulator(LoopbackServer):
    """Feishu's server side for tests: long connection, tenant token, IM messages, CardKit.

    Bound to ``host`` (loopback) on ``port`` (0: any free port; give the old port to restart on
    it).  Everything a test may flip at run time is a plain attribute: ``latency``,
    ``refuse_connections``, ``stop_pongs``, ``ack_timeout``, ``max_redeliveries``,
    ``split_payload``, the ``*_rate_limit``\\ s, ``ping_interval`` and the other ClientConfig
    values...
    """

    error = EmulatorError

    def __init__(
        self,
        apps: Mapping[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ack_timeout: float | None = 3.0,
        max_redeliveries: int = 3,
        token_ttl: float = 7200.0,
        ticket_ttl: float = 60.0,
        ping_interval: int = 120,
        reconnect_count: int = -1,
        reconnect_interval: int = 120,
        reconnect_nonce: int = 30,
        pong_config: bool = True,
        max_connections: int = 50,
        split_payload: int | None = None,
        card_rate_limit: float | None = 10.0,
        app_rate_limit: float | None = 50.0,
        app_minute_limit: float | None = 1000.0,
        chat_rate_limit: float | None = 5.0,
        message_patch_limit: float | None = 5.0,
        streaming_timeout: float = 600.0,
        uuid_window: float = 3600.0,
        bot_name: str = "imgateway-bot",
        tenant_key: str = "2ed263bf32cf1651",
        verification_token: str = "emulator-verification-token",
        seed: int | None = None,
    ) -> None:
        super().__init__(host, port)
        self.apps: dict[str, str] = dict(
            apps if apps is not None else {DEFAULT_APP: DEFAULT_SECRET}
        )
        if not self.apps:
            raise ValueError("at least one app is required")
        # -- settings (all may be changed while running) --
        self.ack_timeout = ack_timeout
        self.max_redeliveries = max_redeliveries
        self.token_ttl = token_ttl
        self.ticket_ttl = ticket_ttl
        self.ping_interval = ping_interval
        self.reconnect_count = reconnect_count
        self.reconnect_interval = reconnect_interval
        self.reconnect_nonce = reconnect_nonce
        self.pong_config = pong_config
        self.max_connections = max_connections
        self.split_payload = split_payload
        self.card_rate_limit = card_rate_limit
        self.app_rate_limit = app_rate_limit
        self.app_minute_limit = app_minute_limit
        self.chat_rate_limit = chat_rate_limit
        self.message_patch_limit = message_patch_limit
        #: seconds after which Feishu switches a card's streaming mode off by itself (10 min)
        self.streaming_timeout = streaming_timeout
        #: seconds for which a send's ``uuid`` returns the first message (1 h)
        self.uuid_window = uuid_window
        self.bot_name = bot_name
        self.tenant_key = tenant_key
        self.verification_token = verification_token
        # -- faults --
        self.latency = 0.0
        self.refuse_connections = False
        self.stop_pongs = False
        # -- observations --
        self.calls: list[CallRecord] = []
        self.violations: list[Violation] = []
        #: every message the bot sent (create and reply), oldest first
        self.messages: list[SentMessage] = []
        self.sent_by_id: dict[str, SentMessage] = {}
        self.cards: dict[str, CardState] = {}
        self.card_clicks: list[CardClick] = []
        #: rate-limit refusals by epoch second, and each one in detail
        self.rejections: collections.Counter[int] = collections.Counter()
        self.rejection_log: list[Rejection] = []
        #: user messages pushed, by IM message id
        self.received: dict[str, Delivery] = {}
        self.chats: dict[str, Chat] = {}
        #: app -> open_id -> user
        self.users: dict[str, dict[str, User]] = {}
        # -- machinery --
        self._rng = random.Random(seed)
        self._faults = FaultPlan()
        self._rates = RateWindow()
        self._delivery_counts: dict[str, int] = {}
        self._longconn = LongConnection(self)
        self._tokens = TokenApi(self)
        self._messages = MessageApi(self)
        self._cardkit = CardKit(self)

    # -- lifecycle --------------------------------------------------------------------------------

    # ``url`` is the domain a client is configured with.

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[len("http") :]

    async def _shut_down(self) -> None:
        """Stop re-pushing and close every websocket (aborting after 1 s)."""
        tasks = [o.task for o in self._longconn.outbound.values() if o.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for outbound in self._longconn.outbound.values():
            outbound.task = None
        lives = self._longconn.live_of()
        await asyncio.gather(
            *(self._longconn.close(live, 1001, "emulator closing") for live in lives),
            return_exceptions=True,
        )

    def _routes(self) -> list[web.RouteDef]:
        longconn, tokens, messages, cards = (
            self._longconn,
            self._tokens,
            self._messages,
            self._cardkit,
        )

        def serve(handler: _Handler, *, auth: bool = True) -> Any:
            async def route(request: web.Request) -> web.StreamResponse:
                return await self._serve(request, handler, auth=auth)

            return route

        async def not_found(call: _Call) -> Any:
            raise ApiError(404, 404, f"404 page not found: {call.path}")

        im = "/open-apis/im/v1/messages"
        card = "/open-apis/cardkit/v1/cards"
        return [
            web.post(ENDPOINT_PATH, serve(longconn.endpoint, auth=False)),
            web.get(WS_PATH, longconn.connect),
            web.post(
                "/open-apis/auth/v3/tenant_access_token/internal",
                serve(tokens.tenant_access_token, auth=False),
            ),
            web.post(im, serve(messages.create)),
            web.post(im + "/{message_id}/reply", serve(messages.reply)),
            web.patch(im + "/{message_id}", serve(messages.patch)),
            web.post(card, serve(cards.create)),
            web.put(
                card + "/{card_id}/elements/{element_id}/content", serve(cards.element_content)
            ),
            web.patch(card + "/{card_id}/settings", serve(cards.settings)),
            web.put(card + "/{card_id}", serve(cards.update)),
            web.get("/open-apis/bot/v3/info", serve(self._bot_info)),
            web.route("*", "/{tail:.*}", serve(not_found, auth=False)),
        ]

    async def _bot_info(self, call: _Call) -> Any:
        """``GET /open-apis/bot/v3/info``: the bot's own identity (flat, beside ``code``); drivers
        read its ``open_id`` to tell @-mentions of the bot from others."""
        assert call.app is not None
        return {
            "code": 0,
            "msg": "ok",
            "bot": {
                "activate_status": 2,
                "app_name": self.bot_name,
                "avatar_url": "",
                "ip_white_list": [],
                "open_id": self.bot(call.app).open_id,
            },
        }

    # -- HTTP plumbing ----------------------------------------------------------------------------

    async def _serve(
        self, request: web.Request, handler: _Handler, *, auth: bool
    ) -> web.StreamResponse:
        started = time.monotonic()
        body, parsed = await read_json(request)
        parse_error = (
            None if parsed else ApiError(400, 9499, "Bad Request: the body is not valid JSON")
        )
        call = _Call(request, request.path, body)
        try:
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            fault = self._faults.take(request.path)
            if fault is not None:
                # An injected 429 is the app's limit, from Feishu's API gateway: with its headers.
                headers = (
                    ApiError.rate_limited(self.app_rate_limit or 50.0).headers
                    if fault.status == 429
                    else None
                )
                raise ApiError(fault.status, fault.code, fault.msg, headers=headers)
            if auth:
                call.app = self._tokens.authenticate(request.headers.get("Authorization"))
            if parse_error is not None:
                raise parse_error
            result = await handler(call)
        except ApiError as error:
            answer = error.body()
            self._record_call(
                request.method, call.path, error.status, error.code, call.app, started, body, answer
            )
            return self._json(answer, error.status, error.headers)
        code = result.get("code", 0) if isinstance(result, dict) else 0
        self._record_call(request.method, call.path, 200, code, call.app, started, body, result)
        return self._json(result)

    @staticmethod
    def _json(
        body: Any, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        return web.json_response(
            body, status=status, dumps=dumps, headers={"X-Tt-Logid": log_id(), **(headers or {})}
        )

    def _record_call(
        self,
        method: str,
        path: str,
        status: int,
        code: int,
        app: str | None,
        started: float,
        body: Any = None,
        response: Any = None,
    ) -> None:
        self.calls.append(CallRecord(method, path, status, code, app, started, body, response))
        self._notify()

    def _admit(self, limit: str, path: str, key: Any, rate: float, window: float = 1.0) -> bool:
        """Count a call against rate limit ``limit`` (``rate`` calls per ``window`` s) for
        ``key``; record it if refused."""
        if self._rates.admit((limit, key), rate, window):
            return True
        now = time.time()
        self.rejections[int(now)] += 1
        self.rejection_log.append(Rejection(limit, path, str(key), time.monotonic(), int(now)))
        return False

    def check_app_limits(self, call: _Call, api: str) -> None:
        """Feishu's per-app, per-API limits (``app_rate_limit``/s, ``app_minute_limit``/min):
        HTTP 429, code 99991400."""
        assert call.app is not None
        for name, rate, window in (
            ("app", self.app_rate_limit, 1.0),
            ("app-minute", self.app_minute_limit, 60.0),
        ):
            if rate is not None and not self._admit(name, call.path, (call.app, api), rate, window):
                raise ApiError.rate_limited(rate)

    # -- people and chats -------------------------------------------------------------------------

    @property
    def default_app(self) -> str:
        return next(iter(self.apps))

    def bot(self, app: str | None = None) -> User:
        """The bot of ``app`` as users see it (its ``open_id`` is what @-mentions carry)."""
        return User.named(app or self.default_app, "bot:" + self.bot_name)

    def user(self, name: str = "alice", app: str | None = None) -> User:
        """User ``name`` (or the open id ``ou_...``) of ``app``, made known to the app."""
        app = app or self.default_app
        user = User.named(app, name)
        self.users.setdefault(app, {})[user.open_id] = user
        return user

    def add_chat(
        self,
        name: str = "default",
        *,
        app: str | None = None,
        chat_id: str | None = None,
        chat_type: str = "group",
    ) -> Chat:
        """Chat ``name`` (or ``chat_id``) of ``app`` with the bot in it: a valid send target."""
        app = app or self.default_app
        chat_id = chat_id or chat_id_for(app, chat_type, name)
        chat = self.chats.get(chat_id)
        if chat is None:
            chat = self.chats[chat_id] = Chat(chat_id, app, chat_type, name)
        return chat

    def p2p_chat(self, app: str, user: User) -> Chat:
        """The 1:1 chat of ``user`` with the bot of ``app``."""
        chat_id = chat_id_for(app, "p2p", user.open_id)
        chat = self.add_chat(user.name, app=app, chat_id=chat_id, chat_type="p2p")
        chat.members.add(user.open_id)
        return chat

    # -- pushing events ---------------------------------------------------------------------------

    def message(
        self,
        text: str = "hello",
        *,
        chat_type: str = "p2p",
        chat_id: str | None = None,
        sender: str = "alice",
        mention_bot: bool = True,
        mentions: Iterable[str] = (),
        message_id: str | None = None,
        event_id: str | None = None,
        app: str | None = None,
        message_type: str = "text",
        content: str | None = None,
        parent_id: str = "",
        root_id: str = "",
    ) -> dict[str, Any]:
        """An ``im.message.receive_v1`` payload.  In groups the @-mentions come first in the text
        as ``@_user_N`` keys (the bot's when ``mention_bot``, then users named in ``mentions``),
        with a ``mentions`` list, as Feishu renders them; ``content`` overrides the text JSON.
        The sender and the chat become known to the app (valid send targets)."""
        if chat_type not in ("p2p", "group"):
            raise ValueError("chat_type must be 'p2p' or 'group'")
        app = app or self.default_app
        user = self.user(sender, app)
        if chat_type == "p2p" and chat_id is None:
            chat = self.p2p_chat(app, user)
        else:
            name = user.name if chat_type == "p2p" else "default"
            chat = self.add_chat(name, app=app, chat_id=chat_id, chat_type=chat_type)
        chat.members.add(user.open_id)
        mentioned = ([self.bot(app)] if chat_type == "group" and mention_bot else []) + [
            self.user(name, app) for name in mentions
        ]
        keys = [f"@_user_{n}" for n in range(1, len(mentioned) + 1)]
        mention_list = [
            {
                "key": key,
                "id": person.ids(),
                "name": person.name.removeprefix("bot:"),
                "tenant_key": self.tenant_key,
            }
            for key, person in zip(keys, mentioned, strict=True)
        ]
        if content is None:
            content = dumps({"text": " ".join([*keys, text]) if keys else text})
        return message_event(
            app=app,
            tenant_key=self.tenant_key,
            token=self.verification_token,
            event_id=event_id or new_event_id(),
            message_id=message_id or new_message_id(),
            chat_id=chat.id,
            chat_type=chat_type,
            sender=user,
            message_type=message_type,
            content=content,
            mentions=mention_list,
            parent_id=parent_id,
            root_id=root_id,
        )

    async def send_message(
        self,
        text: str = "hello",
        *,
        chat_type: str = "p2p",
        chat_id: str | None = None,
        sender: str = "alice",
        message_id: str | None = None,
        event_id: str | None = None,
        mention_bot: bool = True,
        app: str | None = None,
        connection: str | WsConnection | None = None,
        wait_connection: float = 5.0,
        **message_options: Any,
    ) -> Delivery:
        """A user sends ``text``: push the ``im.message.receive_v1`` event to one random live
        connection (re-pushed until ACKed).  A group message that does not @ the bot is not
        delivered (``delivered=False``), as Feishu does for bots without the "all group messages"
        scope."""
        payload = self.message(
            text,
            chat_type=chat_type,
            chat_id=chat_id,
            sender=sender,
            message_id=message_id,
            event_id=event_id,
            mention_bot=mention_bot,
            app=app,
            **message_options,
        )
        message = payload["event"]["message"]
        app = payload["header"]["app_id"]
        if chat_type == "group" and not any(
            m["id"]["open_id"] == self.bot(app).open_id for m in message.get("mentions", [])
        ):
            return Delivery(
                payload["header"]["event_id"],
                payload,
                app,
                message["message_id"],
                message["chat_id"],
                delivered=False,
            )
        return await self.push_event(
            payload, app=app, connection=connection, wait_connection=wait_connection
        )

    async def push_event(
        self,
        payload: Any,
        *,
        app: str | None = None,
        kind: str = "event",
        event_id: str | None = None,
        repush: bool = True,
        connection: str | WsConnection | None = None,
        wait_connection: float = 5.0,
    ) -> Delivery:
        """Push any payload in a ``type=kind`` DATA frame: bytes and str as they are (hostile
        input), anything else as JSON; re-pushed until ACKed when ``repush``.  The event id is
        ``header.event_id`` of a dict payload, else ``event_id`` or a fresh one."""
        app = app or self.default_app
        parsed: Any = payload
        if isinstance(payload, Mapping):
            header = payload.get("header")
            if (
                event_id is None
                and isinstance(header, Mapping)
                and isinstance(header.get("event_id"), str)
            ):
                event_id = header["event_id"]
            raw = dumps(dict(payload)).encode()
        elif isinstance(payload, bytes | str):
            raw = payload.encode() if isinstance(payload, str) else payload
        else:
            raw = dumps(payload).encode()
        event_id = event_id or new_event_id()
        if event_id in self._longconn.outbound:
            raise EmulatorError(f"event {event_id} was already pushed: use redeliver()")
        live = (
            self._longconn.resolve(connection)
            if connection is not None
            else await self._longconn.wait_live(app, wait_connection)
        )
        outbound = self._longconn.new_outbound(event_id, app, kind, raw, repush=repush)
        message_id = chat_id = root_id = None
        if isinstance(payload, Mapping):
            event = payload.get("event")
            message = event.get("message") if isinstance(event, Mapping) else None
            if isinstance(message, Mapping):
                message_id, chat_id = message.get("message_id"), message.get("chat_id")
                root_id = message.get("root_id") or None

        def record(frame_id: str) -> Delivery:
            delivery = Delivery(
                event_id, parsed, app, message_id, chat_id, root_id, True, frame_id, live.conn.id
            )
            if message_id is not None:
                self.received[message_id] = delivery
            return delivery

        try:
            push = await self._longconn.deliver(outbound, live)
        except EmulatorError:
            # The user did send it: the message exists even if this push died with its socket
            # (``redeliver`` pushes it again, and replies to it are accepted).
            record("")
            raise
        self._longconn.schedule_repush(outbound)
        return record(push.frame_id)

    def knows_event(self, event_id: str) -> bool:
        """Whether event ``event_id`` was pushed (at least tried: a push whose connection died
        mid-write is known, and :meth:`redeliver` pushes it again)."""
        return event_id in self._longconn.outbound

    async def redeliver(
        self, event_id: str, *, connection: str | WsConnection | None = None
    ) -> str:
        """Push event ``event_id`` again now, in a new frame; returns the frame's message_id."""
        outbound = self._longconn.outbound.get(event_id)
        if outbound is None:
            raise EmulatorError(f"unknown event {event_id!r}")
        live = (
            self._longconn.resolve(connection)
            if connection is not None
            else await self._longconn.wait_live(outbound.app, 5.0)
        )
        return (await self._longconn.deliver(outbound, live)).frame_id

    async def wait_acked(self, event_id: str, timeout: float = 5.0) -> AckRecord:
        """The first ``code: 200`` ACK of event ``event_id``; ``TimeoutError`` if none comes."""
        outbound = self._longconn.outbound.get(event_id)
        if outbound is None:
            raise EmulatorError(f"unknown event {event_id!r}")
        await self._wait_for(lambda: outbound.ack is not None, timeout)
        assert outbound.ack is not None
        return outbound.ack

    def acked(self, event_id: str) -> bool:
        outbound = self._longconn.outbound.get(event_id)
        return outbound is not None and outbound.ack is not None

    def deliveries(self, event_id: str) -> int:
        """How many frames carried event ``event_id`` (first push and re-pushes)."""
        return self._delivery_counts.get(event_id, 0)

    @property
    def acks(self) -> list[AckRecord]:
        """Every ACK frame received, in order (including non-200 ones)."""
        return list(self._longconn.acks)

    @property
    def pings(self) -> list[PingRecord]:
        return list(self._longconn.pings)

    @property
    def undeliverable(self) -> list[str]:
        """Event ids given up after ``max_redeliveries`` re-pushes without an ACK."""
        return list(self._longconn.undeliverable)

    # -- what the bot sent ------------------------------------------------------------------------

    def replies(self, message_id: str) -> list[SentMessage]:
        """Messages sent with ``/reply`` to user message ``message_id``, oldest first."""
        return [m for m in self.messages if m.reply_to == message_id]

    def card_of(self, message_id: str) -> CardState | None:
        """The CardKit card a bot message carries (sent by reference), if any."""
        message = self.sent_by_id.get(message_id)
        if message is None or message.card_id is None:
            return None
        return self.cards.get(message.card_id)

    def count(self, path_prefix: str, status: int | None = None, method: str | None = None) -> int:
        """How many HTTP calls matched ``path_prefix`` (and ``status``/``method`` if given)."""
        return count_calls(self.calls, path_prefix, status, method)

    # -- card callbacks ---------------------------------------------------------------------------

    async def click_card(
        self,
        target: str,
        user: str = "alice",
        value: Any = None,
        *,
        tag: str = "button",
        timeout: float = 3.0,
        app: str | None = None,
        wait_connection: float = 5.0,
    ) -> Any:
        """User ``user`` (a name or ``ou_`` id) clicks a button of ``target`` (a bot message id or
        a card id): push a ``card.action.trigger`` in a ``type=card`` frame (never re-pushed) and
        return the ACK's decoded ``data`` (the handler's toast/card response), or None when no
        ``code: 200`` ACK came within ``timeout`` (Feishu's limit is 3 s)."""
        card = self.cards.get(target)
        message = self.sent_by_id.get(target)
        if card is None and message is not None and message.card_id is not None:
            card = self.cards.get(message.card_id)
        if card is None and message is None:
            raise EmulatorError(f"no bot message or card {target!r}")
        if message is None and card is not None and card.message_ids:
            message = self.sent_by_id.get(card.message_ids[-1])
        app = app or (
            card.app if card is not None else message.app if message else self.default_app
        )
        operator = self.user(user, app)
        event_id = new_event_id()
        payload = card_action_event(
            app=app,
            tenant_key=self.tenant_key,
            token=self.verification_token,
            event_id=event_id,
            operator=operator,
            value=value if value is not None else {},
            tag=tag,
            message_id=message.message_id if message else None,
            chat_id=message.chat_id if message else None,
        )
        delivery = await self.push_event(
            payload, app=app, kind="card", repush=False, wait_connection=wait_connection
        )
        started = time.monotonic()
        ack: AckRecord | None = None
        with contextlib.suppress(TimeoutError):
            ack = await self.wait_acked(event_id, timeout)
        assert delivery.frame_id is not None and delivery.connection_id is not None
        self.card_clicks.append(
            CardClick(
                event_id=event_id,
                message_id=message.message_id if message else None,
                card_id=card.card_id if card else None,
                user_open_id=operator.open_id,
                value=value,
                frame_id=delivery.frame_id,
                connection_id=delivery.connection_id,
                sent_at=started,
                acked_at=ack.time if ack else None,
                response=ack.response if ack else None,
            )
        )
        return ack.response if ack else None

    # -- connections ------------------------------------------------------------------------------

    @property
    def live_connections(self) -> list[WsConnection]:
        """Live long connections, oldest first."""
        return [live.conn for live in self._longconn.live_of()]

    @property
    def connection_history(self) -> list[WsConnection]:
        """Every websocket ever accepted, closed ones included."""
        return list(self._longconn.history)

    @property
    def endpoint_grants(self) -> int:
        """Successful ``/callback/ws/endpoint`` answers (URLs handed out)."""
        return self._longconn.endpoint_grants

    async def wait_connected(
        self, count: int = 1, *, app: str | None = None, timeout: float = 5.0
    ) -> list[WsConnection]:
        """Wait until ``app`` (any app if None) has ``count`` live connections."""
        await self._wait_for(lambda: len(self._longconn.live_of(app)) >= count, timeout)
        return [live.conn for live in self._longconn.live_of(app)]

    async def drop_connections(self, app: str | None = None) -> int:
        """Abort the TCP connections (no close frame), as a network failure would."""
        targets = self._longconn.live_of(app)
        for live in targets:
            self._longconn.abort(live)
        await self._longconn.wait_gone(targets)
        return len(targets)

    async def server_close(
        self, app: str | None = None, code: int = 1000, message: str = ""
    ) -> int:
        """Close the connections politely, with a websocket close frame carrying ``code``."""
        targets = self._longconn.live_of(app)
        await asyncio.gather(*(self._longconn.close(live, code, message) for live in targets))
        await self._longconn.wait_gone(targets)
        return len(targets)

    # -- OpenAPI faults ---------------------------------------------------------------------------

    def fail_next(
        self,
        path_prefix: str = "",
        count: int = 1,
        http_status: int = 500,
        code: int | None = None,
        msg: str | None = None,
    ) -> None:
        """Answer the next ``count`` HTTP requests whose path starts with ``path_prefix`` with an
        error.  Without ``code``/``msg``: 400 -> 99991663 (invalid token), 429 -> 99991400
        (the app's frequency limit; a 429 always carries the ``x-ogw-ratelimit-*`` headers of
        Feishu's API gateway), anything else -> code 1 "internal error".  On the endpoint use
        ``http_status=200, code=1`` for Feishu's "system busy" answer; on ``/ws/v2`` the
        websocket upgrade is refused with ``http_status`` and ``handshake-status: code``."""
        default_code, default_msg = _DEFAULT_FAULTS.get(http_status, (1, "internal error"))
        self._faults.add(
            Fault(
                path_prefix,
                count,
                http_status,
                default_code if code is None else code,
                default_msg if msg is None else msg,
            )
        )

    def clear_faults(self) -> None:
        self._faults.clear()

    def expire_tokens(self) -> None:
        """Invalidate every tenant token now: the next call with one gets 99991663."""
        self._tokens.expire()

    def expire_streaming(self, card_id: str) -> None:
        """Feishu's streaming timeout, now, for one card: streaming mode goes off and the next
        element content call gets 200850 (later ones 300309)."""
        card = self.cards[card_id]
        if card.streaming_started_at is not None:
            card.streaming_started_at -= self.streaming_timeout + 1.0
        self._cardkit.expire(card)

    @property
    def tokens_issued(self) -> int:
        return self._tokens.issued
