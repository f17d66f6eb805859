"""The Stream gateway: ``connections/open``, the ``/connect`` websocket, pushes, acks, redelivery.

Research doc §1: tickets are single-use and live 90 s; ``connectionId`` is the ticket; every frame is
``{"specVersion", "type", "headers", "data": "<JSON string>"}`` with ``headers.time`` a string; acks
are text frames matched by ``headers.messageId`` on the connection that delivered the frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape

import attrs
from aiohttp import WSMsgType, web

from gateway_dingtalk.emulator._faults import ApiError
from gateway_dingtalk.emulator._payloads import build_frame, dumps, frame_id, unified_app_id
from gateway_dingtalk.emulator._records import (
    AckRecord,
    EmulatorError,
    PingRecord,
    StreamConnection,
    Subscription,
    Violation,
)

if TYPE_CHECKING:
    from gateway_dingtalk.emulator._server import DingTalkEmulator, _Call

__all__ = ["StreamGateway"]

_SUBSCRIPTION_TYPES = ("EVENT", "CALLBACK", "SYSTEM")


@attrs.define(eq=False)
class _Ticket:
    app: str
    subscriptions: tuple[Subscription, ...]
    issued_at: float
    ua: str
    local_ip: str


@attrs.define(eq=False)
class _Live:
    conn: StreamConnection
    ws: web.WebSocketResponse
    transport: asyncio.BaseTransport | None
    tasks: set[asyncio.Task[None]] = attrs.field(factory=set)
    done: asyncio.Event = attrs.field(factory=asyncio.Event)
    #: set by the emulator to make the handler close with (code, message)
    close_request: asyncio.Future[tuple[int, str]] = attrs.field(
        factory=lambda: asyncio.get_running_loop().create_future()
    )
    sent_close_code: int | None = None


@attrs.define(eq=False)
class _Outbound:
    """One logical push (a robot message, an event, a card click): every delivery carries the same
    ``data`` string."""

    key: str
    app: str
    frame_type: str
    topic: str
    data: str
    kind: str  # "message" | "event" | "card" | "raw"
    extra_headers: dict[str, str] = attrs.field(factory=dict)
    frame_ids: list[str] = attrs.field(factory=list)
    last_push: float = 0.0
    ack: AckRecord | None = None
    task: asyncio.Task[None] | None = None


@attrs.define(eq=False)
class _Push:
    """One frame on one connection."""

    frame_id: str
    connection_id: str
    frame_type: str
    topic: str
    kind: str  # as _Outbound.kind, or "ping" | "system"
    sent_at: float
    outbound: _Outbound | None = None
    ack: AckRecord | None = None


class StreamGateway:
    """The emulator's Stream side.  State that tests read is exposed by :class:`DingTalkEmulator`."""

    def __init__(self, emu: DingTalkEmulator) -> None:
        self.emu = emu
        self.tickets: dict[str, _Ticket] = {}
        self.live: dict[str, _Live] = {}
        self.history: list[StreamConnection] = []
        self.connection_opens = 0
        self.pushes: dict[str, list[_Push]] = {}
        self.outbound: dict[str, _Outbound] = {}
        self.delivery_counts: dict[str, int] = {}
        self.acks: list[AckRecord] = []
        self.misrouted_acks: list[AckRecord] = []
        self.pings: list[PingRecord] = []
        self._ping_index: dict[str, int] = {}
        self.undeliverable: list[str] = []
        self.pings_paused = False

    # -- HTTP: connections/open ---------------------------------------------------------------

    async def open_connection(self, call: _Call) -> Any:
        emu = self.emu
        body = call.body if isinstance(call.body, dict) else {}
        client_id = body.get("clientId")
        secret = body.get("clientSecret")
        if isinstance(client_id, str) and client_id in emu.apps:
            call.app = client_id
        if emu.refuse_connections:
            raise ApiError(503, "ServiceUnavailable", "服务暂不可用")
        if not isinstance(client_id, str) or not client_id or not isinstance(secret, str):
            raise ApiError(400, "MissingParameter", "clientId and clientSecret are required")
        if emu.apps.get(client_id) != secret:
            raise ApiError(401, "authFailed", "鉴权失败")
        subscriptions = self._subscriptions(body.get("subscriptions"))
        if emu.distribution == "reject" and self.live_of(client_id):
            raise ApiError(401, "authFailed", "鉴权失败")
        ticket = str(uuid.uuid4())
        self.tickets[ticket] = _Ticket(
            app=client_id,
            subscriptions=subscriptions,
            issued_at=time.monotonic(),
            ua=str(body.get("ua") or ""),
            local_ip=str(body.get("localIp") or ""),
        )
        self.connection_opens += 1
        emu._notify()
        answer = {"endpoint": emu.ws_url, "ticket": ticket}
        accept = call.request.headers.get("Accept", "")
        if emu.require_json_accept and "json" not in accept.lower():
            # The real gateway answers XML unless asked for JSON ([NODE] client.ts).
            xml = (
                "<OpenConnectionResponse>"
                f"<endpoint>{escape(answer['endpoint'])}</endpoint><ticket>{ticket}</ticket>"
                "</OpenConnectionResponse>"
            )
            return web.Response(text=xml, content_type="application/xml")
        return answer

    @staticmethod
    def _subscriptions(raw: Any) -> tuple[Subscription, ...]:
        if not isinstance(raw, list) or not raw:
            raise ApiError(400, "MissingParameter", "subscriptions is required")
        result: list[Subscription] = []
        for item in raw:
            if not isinstance(item, dict):
                raise ApiError(400, "InvalidParameter", "subscriptions must be objects")
            kind, topic = item.get("type"), item.get("topic")
            if kind not in _SUBSCRIPTION_TYPES or not isinstance(topic, str) or not topic:
                raise ApiError(400, "InvalidParameter", f"invalid subscription {item!r}")
            if kind == "EVENT" and topic != "*":
                raise ApiError(400, "InvalidParameter", "EVENT subscriptions accept only topic *")
            result.append(Subscription(kind, topic))
        return tuple(result)

    # -- websocket: /connect --------------------------------------------------------------------

    async def connect(self, request: web.Request) -> web.StreamResponse:
        emu = self.emu
        ticket_id = request.query.get("ticket", "")
        ticket = self.tickets.pop(ticket_id, None)  # single use, even when it fails below
        started = time.monotonic()
        error: ApiError | None = None
        if emu.refuse_connections:
            error = ApiError(503, "ServiceUnavailable", "服务暂不可用")
        elif ticket is None or started - ticket.issued_at > emu.ticket_ttl:
            error = ApiError(401, "authFailed", "鉴权失败")
        elif emu.distribution == "reject" and self.live_of(ticket.app):
            error = ApiError(401, "authFailed", "鉴权失败")
        ws = web.WebSocketResponse(autoping=False, timeout=1.0, max_msg_size=16 * 2**20)
        if error is None and not ws.can_prepare(request).ok:
            error = ApiError(400, "InvalidParameter", "a websocket upgrade is required")
        app = ticket.app if ticket is not None else None
        emu._record_call("GET", request.path, error.status if error else 101, error, app, started)
        if error is not None:
            return web.json_response(error.body(), status=error.status)
        assert ticket is not None
        await ws.prepare(request)
        conn = StreamConnection(
            id=ticket_id,
            app=ticket.app,
            subscriptions=ticket.subscriptions,
            opened_at=time.monotonic(),
            ua=ticket.ua,
            local_ip=ticket.local_ip,
        )
        live = _Live(conn, ws, request.transport)
        if emu.distribution == "newest":
            for older in self.live_of(conn.app):
                older.conn.closed_by = "replaced"
                self._spawn(self._close(older, 1000, "replaced by a newer connection"))
        self.live[conn.id] = live
        self.history.append(conn)
        if emu.ping_interval is not None:
            self._spawn(self._ping_loop(live), live)
        emu._notify()
        try:
            await self._receive(live)
        finally:
            conn.closed_at = time.monotonic()
            code = live.sent_close_code if live.sent_close_code is not None else ws.close_code
            conn.close_code = int(code) if code is not None else None
            conn.closed_by = conn.closed_by or "client"
            self.live.pop(conn.id, None)
            for task in list(live.tasks):
                task.cancel()
            live.done.set()
            emu._notify()
        return ws

    async def _receive(self, live: _Live) -> None:
        ws = live.ws
        while True:
            # The handler itself closes when asked to: aiohttp then completes the close handshake
            # (a close() from another task would drop the TCP connection right after the frame).
            receiving = asyncio.ensure_future(ws.receive())
            waiting: list[asyncio.Future[Any]] = [receiving, live.close_request]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not receiving.done():
                receiving.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await receiving
                code, message = live.close_request.result()
                live.sent_close_code = code
                with contextlib.suppress(Exception):
                    await ws.close(code=code, message=message.encode())
                return
            try:
                msg = receiving.result()
            except (ConnectionError, RuntimeError):
                return
            if msg.type == WSMsgType.TEXT:
                self._on_text(live, msg.data)
            elif msg.type == WSMsgType.BINARY:
                self._violation("binary_frame", f"{len(msg.data)} bytes", live.conn.id)
            elif msg.type == WSMsgType.PING:
                if not self.emu.ignore_ws_pings:
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await ws.pong(msg.data)
            elif msg.type == WSMsgType.PONG:
                continue
            else:  # CLOSE, CLOSING, CLOSED, ERROR
                return

    def _spawn(self, coro: Any, live: _Live | None = None) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        owner = live.tasks if live is not None else self.emu._tasks
        owner.add(task)
        task.add_done_callback(owner.discard)
        return task

    # -- acks --------------------------------------------------------------------------------

    def _violation(self, kind: str, detail: str, connection_id: str | None) -> None:
        self.emu.violations.append(Violation(kind, detail, connection_id, time.monotonic()))

    def _on_text(self, live: _Live, text: str) -> None:
        conn_id = live.conn.id
        try:
            frame = json.loads(text)
        except ValueError:
            self._violation("bad_frame", f"not JSON: {text[:200]!r}", conn_id)
            return
        headers = frame.get("headers") if isinstance(frame, dict) else None
        if not isinstance(headers, dict) or "messageId" not in headers or "code" not in frame:
            self._violation("bad_frame", f"not an ack: {text[:200]!r}", conn_id)
            return
        message_id = str(headers["messageId"])
        pushes = self.pushes.get(message_id)
        if not pushes:
            self._violation("unknown_ack", f"ack for unknown messageId {message_id}", conn_id)
            return
        raw_data = frame.get("data")
        data: Any = raw_data
        if isinstance(raw_data, str):
            with contextlib.suppress(ValueError):
                data = json.loads(raw_data) if raw_data else None
        else:
            self._violation(
                "ack_data_not_string", f"ack data is {type(raw_data).__name__}", conn_id
            )
        push = next((p for p in pushes if p.connection_id == conn_id), None)
        now = time.monotonic()
        reference = push or pushes[-1]
        record = AckRecord(
            frame_id=message_id,
            msg_id=reference.outbound.key if reference.outbound else message_id,
            connection_id=conn_id,
            topic=reference.topic,
            frame_type=reference.frame_type,
            code=frame.get("code"),
            message=frame.get("message"),
            data=data,
            raw=frame,
            time=now,
            latency=now - reference.sent_at,
        )
        if push is None:
            self.misrouted_acks.append(record)
            others = ", ".join(p.connection_id for p in pushes)
            self._violation(
                "misrouted_ack",
                f"ack for {message_id} (sent on {others}) came on {conn_id}",
                conn_id,
            )
            return
        if push.ack is not None:
            self._violation("duplicate_ack", f"second ack for {message_id}", conn_id)
            return
        push.ack = record
        self.acks.append(record)
        if push.kind == "card" and record.latency > self.emu.card_callback_limit:
            self._violation(
                "late_card_ack", f"card callback acked after {record.latency:.2f} s", conn_id
            )
        if push.kind == "ping":
            self._on_ping_ack(push, data, conn_id)
        outbound = push.outbound
        if outbound is not None and outbound.ack is None and _succeeded(record):
            outbound.ack = record
            if outbound.task is not None:
                outbound.task.cancel()
                outbound.task = None
        self.emu._notify()

    def _on_ping_ack(self, push: _Push, data: Any, conn_id: str) -> None:
        index = self._ping_index.get(push.frame_id)
        if index is None:
            return
        ping = self.pings[index]
        echoed = data.get("opaque") if isinstance(data, dict) else None
        self.pings[index] = attrs.evolve(ping, acked_at=time.monotonic(), echoed=echoed)
        if echoed != ping.opaque:
            self._violation(
                "opaque_mismatch", f"ping {ping.opaque!r} acked with {echoed!r}", conn_id
            )

    # -- pushing ------------------------------------------------------------------------------

    def live_of(self, app: str | None = None) -> list[_Live]:
        return [
            live
            for live in self.live.values()
            if (app is None or live.conn.app == app) and live.conn.live and not live.ws.closed
        ]

    def candidates(self, app: str, frame_type: str, topic: str) -> list[_Live]:
        return [
            live
            for live in self.live_of(app)
            if not live.conn.draining and live.conn.subscribed(frame_type, topic)
        ]

    def choose(self, candidates: list[_Live]) -> _Live | None:
        if not candidates:
            return None
        if self.emu.distribution == "random":
            return self.emu._rng.choice(candidates)
        return max(candidates, key=lambda live: live.conn.opened_at)

    def resolve(self, connection: str | StreamConnection) -> _Live:
        conn_id = connection.id if isinstance(connection, StreamConnection) else connection
        live = self.live.get(conn_id)
        if live is None or live.ws.closed:
            raise EmulatorError(f"connection {conn_id} is not live")
        return live

    async def wait_candidate(
        self,
        app: str,
        frame_type: str,
        topic: str,
        connection: str | StreamConnection | None,
        timeout: float,
    ) -> _Live:
        if connection is not None:
            return self.resolve(connection)

        def ready() -> bool:
            return bool(self.candidates(app, frame_type, topic))

        def unsubscribed() -> bool:
            live = [c for c in self.live_of(app) if not c.conn.draining]
            return bool(live) and not ready()

        if not ready() and not unsubscribed() and timeout > 0:
            with contextlib.suppress(TimeoutError):
                await self.emu._wait_for(lambda: ready() or unsubscribed(), timeout)
        choice = self.choose(self.candidates(app, frame_type, topic))
        if choice is not None:
            return choice
        if unsubscribed():
            raise EmulatorError(
                f"no live connection of {app} subscribed to {frame_type} {topic}: "
                "DingTalk would not push it"
            )
        raise EmulatorError(f"no live connection of {app} to push {topic} to")

    async def push(
        self,
        live: _Live,
        frame_type: str,
        topic: str,
        data: str,
        *,
        kind: str,
        message_id: str | None = None,
        outbound: _Outbound | None = None,
        extra_headers: dict[str, str] | None = None,
        bare: bool = False,
    ) -> _Push:
        """Send one frame on ``live``; ``bare`` leaves out appId/connectionId (as real disconnect
        frames do)."""
        conn = live.conn
        message_id = message_id or frame_id(self.emu._rng)
        frame = build_frame(
            frame_type,
            topic,
            data,
            message_id=message_id,
            app_id=None if bare else unified_app_id(conn.app),
            connection_id=None if bare else conn.id,
            extra_headers=extra_headers,
        )
        push = _Push(message_id, conn.id, frame_type, topic, kind, time.monotonic(), outbound)
        self.pushes.setdefault(message_id, []).append(push)
        try:
            await live.ws.send_str(dumps(frame))
        except (ConnectionError, RuntimeError) as exc:
            self.pushes[message_id].remove(push)
            raise EmulatorError(f"connection {conn.id} went away while pushing: {exc}") from exc
        self.emu.frames.append((conn.id, frame))
        return push

    async def deliver(self, outbound: _Outbound, live: _Live) -> _Push:
        reuse = not self.emu.redeliver_new_frame_id and outbound.frame_ids
        message_id = outbound.frame_ids[0] if reuse else frame_id(self.emu._rng)
        push = await self.push(
            live,
            outbound.frame_type,
            outbound.topic,
            outbound.data,
            kind=outbound.kind,
            message_id=message_id,
            outbound=outbound,
            extra_headers=outbound.extra_headers,
        )
        outbound.frame_ids.append(message_id)
        outbound.last_push = push.sent_at
        self.delivery_counts[outbound.key] = self.delivery_counts.get(outbound.key, 0) + 1
        self.emu._notify()
        return push

    async def send(self, outbound: _Outbound, live: _Live, *, redeliver: bool) -> _Push:
        previous = self.outbound.get(outbound.key)
        if previous is not None and previous.task is not None:
            previous.task.cancel()
        self.outbound[outbound.key] = outbound
        push = await self.deliver(outbound, live)
        if redeliver and outbound.ack is None:
            outbound.task = self._spawn(self._redeliver_loop(outbound))
        return push

    async def _redeliver_loop(self, outbound: _Outbound) -> None:
        emu = self.emu
        left = emu.max_redeliveries
        while left > 0 and emu.ack_timeout is not None:
            delay = outbound.last_push + emu.ack_timeout - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            if outbound.ack is not None:
                return
            left -= 1
            live = self.choose(self.candidates(outbound.app, outbound.frame_type, outbound.topic))
            if live is None:
                self.undeliverable.append(outbound.key)
                outbound.last_push = time.monotonic()
                continue
            try:
                await self.deliver(outbound, live)
            except EmulatorError:
                self.undeliverable.append(outbound.key)
                outbound.last_push = time.monotonic()

    # -- SYSTEM frames ------------------------------------------------------------------------

    async def _ping_loop(self, live: _Live) -> None:
        while live.conn.live:
            await asyncio.sleep(self.emu.ping_interval or 1.0)
            if self.emu.ping_interval is None or self.pings_paused or live.ws.closed:
                continue
            with contextlib.suppress(EmulatorError):
                await self.send_ping(live)

    async def send_ping(self, live: _Live) -> PingRecord:
        opaque = str(uuid.uuid4())
        push = await self.push(live, "SYSTEM", "ping", dumps({"opaque": opaque}), kind="ping")
        record = PingRecord(live.conn.id, push.frame_id, opaque, push.sent_at)
        self._ping_index[push.frame_id] = len(self.pings)
        self.pings.append(record)
        return record

    async def send_disconnect(self, live: _Live, reason: str, close_after: float) -> None:
        live.conn.draining = True
        with contextlib.suppress(EmulatorError):
            await self.push(
                live, "SYSTEM", "disconnect", dumps({"reason": reason}), kind="system", bare=True
            )
        self._spawn(self._close_later(live, close_after), live)

    async def _close_later(self, live: _Live, delay: float) -> None:
        await asyncio.sleep(delay)
        if live.conn.live:
            live.conn.closed_by = "disconnect-timeout"
            self.abort(live)

    def abort(self, live: _Live) -> None:
        """Close the TCP connection without a close frame."""
        if isinstance(live.transport, asyncio.WriteTransport):
            live.transport.abort()
        else:  # pragma: no cover - aiohttp always has a transport while a handler runs
            self._spawn(live.ws.close(code=1006))

    async def _close(self, live: _Live, code: int, message: str) -> None:
        """Close with a close frame; aiohttp waits up to 1 s for the client's answer and then
        closes the transport gracefully; abort if even that did not end the connection."""
        if not live.close_request.done():
            live.close_request.set_result((code, message))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.done.wait(), 2.0)
        if live.conn.live:
            self.abort(live)

    async def close_connections(
        self, lives: list[_Live], *, code: int, message: str, closed_by: str
    ) -> None:
        for live in lives:
            live.conn.closed_by = live.conn.closed_by or closed_by
        await asyncio.gather(*(self._close(live, code, message) for live in lives))
        await self.wait_gone(lives)

    async def wait_gone(self, lives: list[_Live], timeout: float = 2.0) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                for live in lives:
                    await live.done.wait()


def _succeeded(ack: AckRecord) -> bool:
    """An ack that stops redelivery: code 200 and, for events, not ``status: LATER``."""
    if ack.code != 200:
        return False
    return not (
        ack.frame_type == "EVENT"
        and isinstance(ack.data, dict)
        and ack.data.get("status") == "LATER"
    )
