"""The long connection: ``/callback/ws/endpoint``, the pbbp2 websocket, pushes, ACKs, re-push.

Wire behaviour from lark-oapi 1.7.5 ``ws/client.py`` (research doc §2.1): the endpoint answers
``{code, msg, data: {URL, ClientConfig}}``; the URL carries ``device_id`` and ``service_id``;
handshake refusals carry ``handshake-status``/``handshake-msg``/``handshake-autherrcode`` headers;
events are DATA frames (``type``, ``message_id``, ``sum``, ``seq``, ``trace_id``) ACKed by the
client writing the same frame back with ``{"code": 200}``; un-ACKed events are re-pushed with the
same ``event_id`` in a new frame (new ``message_id``) to one random live connection of the app.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import time
from typing import TYPE_CHECKING, Any

import attrs
from aiohttp import WSMsgType, web

from gateway_feishu._frames import CONTROL, DATA, Frame, FrameError
from gateway_feishu.emulator._records import (
    AckRecord,
    EmulatorError,
    PingRecord,
    Violation,
    WsConnection,
)

if TYPE_CHECKING:
    from gateway_feishu.emulator._server import FeishuEmulator, _Call

__all__ = ["LongConnection"]

ENDPOINT_PATH = "/callback/ws/endpoint"
WS_PATH = "/ws/v2"

#: lark-oapi ``ws/const.py``
SYSTEM_BUSY = 1
FORBIDDEN = 403
AUTH_FAILED = 514
EXCEED_CONN_LIMIT = 1000040350


@attrs.define(eq=False)
class _Ticket:
    app: str
    device_id: str
    service_id: int
    issued_at: float


@attrs.define(eq=False)
class _Outbound:
    """One logical push (an event or a card callback): every delivery carries the same payload."""

    event_id: str
    app: str
    kind: str  # the frame's ``type`` header: "event" | "card"
    payload: bytes
    repush: bool
    frame_ids: list[str] = attrs.field(factory=list)
    ack: AckRecord | None = None
    last_push: float = 0.0
    task: asyncio.Task[None] | None = None


@attrs.define(eq=False)
class _Push:
    """One frame (all its parts) on one connection."""

    frame_id: str
    connection_id: str
    sent_at: float
    outbound: _Outbound | None
    ack: AckRecord | None = None


@attrs.define(eq=False)
class _Live:
    conn: WsConnection
    ws: web.WebSocketResponse
    transport: asyncio.Transport | None
    pushes: dict[str, _Push] = attrs.field(factory=dict)
    send_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock)


def _handshake_refusal(status: int, code: int, msg: str, auth_code: int | None) -> web.Response:
    headers = {"handshake-status": str(code), "handshake-msg": msg}
    if auth_code is not None:
        headers["handshake-autherrcode"] = str(auth_code)
    return web.Response(status=status, headers=headers, text=msg)


class LongConnection:
    """The emulator's long-connection side; :class:`FeishuEmulator` exposes what tests read."""

    def __init__(self, emu: FeishuEmulator) -> None:
        self.emu = emu
        self.tickets: dict[str, _Ticket] = {}
        self.live: dict[str, _Live] = {}
        self.history: list[WsConnection] = []
        self.outbound: dict[str, _Outbound] = {}
        self.acks: list[AckRecord] = []
        self.pings: list[PingRecord] = []
        self.undeliverable: list[str] = []
        self.endpoint_grants = 0
        self._service_ids = iter(range(33554678, 2**31))

    # -- HTTP: the endpoint ---------------------------------------------------------------------

    def client_config(self) -> dict[str, int]:
        emu = self.emu
        return {
            "ReconnectCount": emu.reconnect_count,
            "ReconnectInterval": emu.reconnect_interval,
            "ReconnectNonce": emu.reconnect_nonce,
            "PingInterval": emu.ping_interval,
        }

    async def endpoint(self, call: _Call) -> Any:
        emu = self.emu
        body = call.body if isinstance(call.body, dict) else {}
        app, secret = body.get("AppID"), body.get("AppSecret")
        if isinstance(app, str) and app in emu.apps:
            call.app = app
        if emu.refuse_connections:
            return {"code": SYSTEM_BUSY, "msg": "system busy", "data": None}
        if not isinstance(app, str) or emu.apps.get(app) != secret:
            return {"code": AUTH_FAILED, "msg": "auth failed", "data": None}
        if len(self.live_of(app)) >= emu.max_connections:
            return {"code": EXCEED_CONN_LIMIT, "msg": "exceed connection limit", "data": None}
        device_id = str(7_000_000_000_000_000_000 + secrets.randbelow(10**18))
        ticket = secrets.token_hex(16)
        self.tickets[ticket] = _Ticket(app, device_id, next(self._service_ids), time.monotonic())
        self.endpoint_grants += 1
        emu._notify()
        url = (
            f"{emu.ws_url}{WS_PATH}?fpid=493&aid=552564&device_id={device_id}"
            f"&access_key={secrets.token_hex(16)}&service_id={self.tickets[ticket].service_id}"
            f"&ticket={ticket}"
        )
        return {"code": 0, "msg": "ok", "data": {"URL": url, "ClientConfig": self.client_config()}}

    # -- websocket ----------------------------------------------------------------------------------

    async def connect(self, request: web.Request) -> web.StreamResponse:
        emu = self.emu
        ticket = self.tickets.pop(request.query.get("ticket", ""), None)  # single use
        started = time.monotonic()
        refusal: web.Response | None = None
        fault = emu._faults.take(request.path)
        if fault is not None:
            refusal = _handshake_refusal(fault.status, fault.code, fault.msg, None)
        elif emu.refuse_connections:
            refusal = _handshake_refusal(503, SYSTEM_BUSY, "system busy", None)
        elif ticket is None or started - ticket.issued_at > emu.ticket_ttl:
            refusal = _handshake_refusal(403, FORBIDDEN, "invalid or expired ticket", None)
        elif len(self.live_of(ticket.app)) >= emu.max_connections:
            refusal = _handshake_refusal(
                403, AUTH_FAILED, "exceed connection limit", EXCEED_CONN_LIMIT
            )
        app = ticket.app if ticket is not None else None
        if refusal is not None:
            emu._record_call("GET", request.path, refusal.status, 0, app, started)
            return refusal
        assert ticket is not None
        ws = web.WebSocketResponse(autoping=False, max_msg_size=16 * 2**20)
        if not ws.can_prepare(request).ok:
            return _handshake_refusal(400, FORBIDDEN, "websocket upgrade required", None)
        await ws.prepare(request)
        emu._record_call("GET", request.path, 101, 0, app, started)
        conn = WsConnection(ticket.device_id, ticket.app, ticket.service_id, time.monotonic())
        live = _Live(conn, ws, request.transport)
        self.live[conn.id] = live
        self.history.append(conn)
        emu._notify()
        try:
            await self._read(live)
        finally:
            self.live.pop(conn.id, None)
            if conn.closed_at is None:
                conn.closed_at = time.monotonic()
                conn.closed_by = conn.closed_by or "client"
            emu._notify()
        return ws

    async def _read(self, live: _Live) -> None:
        async for message in live.ws:
            if message.type == WSMsgType.BINARY:
                await self._on_frame(live, message.data)
            elif message.type == WSMsgType.PING:
                if not self.emu.stop_pongs:
                    await live.ws.pong(message.data)
            elif message.type == WSMsgType.TEXT:
                self.violation("text_frame", message.data[:200], live)
            elif message.type == WSMsgType.ERROR:
                break

    async def _on_frame(self, live: _Live, data: bytes) -> None:
        try:
            frame = Frame.from_bytes(data)
        except FrameError as exc:
            self.violation("bad_frame", str(exc), live)
            return
        if frame.method == CONTROL and frame.type == "ping":
            answered = not self.emu.stop_pongs
            self.pings.append(PingRecord(live.conn.id, time.monotonic(), answered))
            self.emu._notify()
            if answered:
                config = self.client_config() if self.emu.pong_config else None
                await self._send(live, Frame.pong(frame.service, config))
            return
        if frame.method == DATA:
            self._on_ack(live, frame)
            return
        self.violation("unexpected_frame", f"method={frame.method} type={frame.type}", live)

    def _on_ack(self, live: _Live, frame: Frame) -> None:
        frame_id = frame.header("message_id") or ""
        push = live.pushes.get(frame_id)
        if push is None:
            self.violation("unknown_ack", f"no frame {frame_id!r} on this connection", live)
            return
        if push.ack is not None:
            self.violation("duplicate_ack", f"frame {frame_id!r} acked twice", live)
            return
        code, response = self._parse_ack(live, frame.payload)
        now = time.monotonic()
        outbound = push.outbound
        record = AckRecord(
            frame_id=frame_id,
            event_id=outbound.event_id if outbound else None,
            connection_id=live.conn.id,
            code=code,
            response=response,
            biz_rt=frame.header("biz_rt"),
            payload=frame.payload,
            time=now,
            latency=now - push.sent_at,
        )
        push.ack = record
        self.acks.append(record)
        # A code other than 200 (lark-oapi sends 500 when the handler raised) leaves the event
        # un-ACKed, so it is re-pushed like one that got no answer.
        if outbound is not None and outbound.ack is None and record.ok:
            outbound.ack = record
        self.emu._notify()

    def _parse_ack(self, live: _Live, payload: bytes) -> tuple[Any, Any]:
        try:
            body = json.loads(payload)
        except ValueError:
            self.violation("bad_ack_payload", repr(payload[:200]), live)
            return None, None
        if not isinstance(body, dict):
            self.violation("bad_ack_payload", repr(payload[:200]), live)
            return None, None
        data = body.get("data")
        if data is None:
            return body.get("code"), None
        try:
            return body.get("code"), json.loads(base64.b64decode(data, validate=True))
        except (ValueError, TypeError, binascii.Error):
            self.violation("bad_ack_payload", f"data is not base64 JSON: {data!r:.200}", live)
            return body.get("code"), data

    def violation(self, kind: str, detail: str, live: _Live | None = None) -> None:
        conn_id = live.conn.id if live is not None else None
        self.emu.violations.append(Violation(kind, detail, conn_id, time.monotonic()))
        self.emu._notify()

    # -- pushing --------------------------------------------------------------------------------

    def live_of(self, app: str | None = None) -> list[_Live]:
        return [
            live
            for live in self.live.values()
            if live.conn.live and (app is None or live.conn.app == app) and not live.ws.closed
        ]

    def resolve(self, connection: str | WsConnection) -> _Live:
        conn_id = connection if isinstance(connection, str) else connection.id
        live = self.live.get(conn_id)
        if live is None or not live.conn.live:
            raise EmulatorError(f"connection {conn_id} is not live")
        return live

    async def wait_live(self, app: str, timeout: float) -> _Live:
        """A random live connection of ``app`` (cluster mode), waiting up to ``timeout`` s."""
        try:
            await self.emu._wait_for(lambda: bool(self.live_of(app)), timeout)
        except TimeoutError:
            raise EmulatorError(f"no live connection of {app} within {timeout} s") from None
        return self.emu._rng.choice(self.live_of(app))

    def new_outbound(
        self, event_id: str, app: str, kind: str, payload: bytes, *, repush: bool
    ) -> _Outbound:
        outbound = _Outbound(event_id, app, kind, payload, repush)
        self.outbound[event_id] = outbound
        return outbound

    async def deliver(self, outbound: _Outbound, live: _Live) -> _Push:
        """Push ``outbound`` on ``live`` in a new frame (split in parts above ``split_payload``)."""
        frame_id = secrets.token_hex(16)
        trace_id = secrets.token_hex(8)
        size = self.emu.split_payload
        payload = outbound.payload
        chunks = [payload]
        if size is not None and len(payload) > size:
            chunks = [payload[i : i + size] for i in range(0, len(payload), size)]
        push = _Push(frame_id, live.conn.id, time.monotonic(), outbound)
        live.pushes[frame_id] = push
        outbound.frame_ids.append(frame_id)
        outbound.last_push = push.sent_at
        self.emu._delivery_counts[outbound.event_id] = (
            self.emu._delivery_counts.get(outbound.event_id, 0) + 1
        )
        for seq, chunk in enumerate(chunks):
            headers = (
                ("type", outbound.kind),
                ("message_id", frame_id),
                ("sum", str(len(chunks))),
                ("seq", str(seq)),
                ("trace_id", trace_id),
            )
            frame = attrs.evolve(
                Frame.build(DATA, headers, chunk, service=live.conn.service_id),
                log_id=secrets.randbits(63),
            )
            await self._send(live, frame)
        self.emu._notify()
        return push

    async def _send(self, live: _Live, frame: Frame) -> None:
        async with live.send_lock:
            try:
                await live.ws.send_bytes(frame.to_bytes())
            except (ConnectionError, RuntimeError) as exc:
                raise EmulatorError(f"connection {live.conn.id} went away: {exc}") from exc

    def schedule_repush(self, outbound: _Outbound) -> None:
        if outbound.repush and outbound.task is None:
            outbound.task = asyncio.get_running_loop().create_task(self._repush(outbound))

    async def _repush(self, outbound: _Outbound) -> None:
        """Feishu's "超时重推": re-push an un-ACKed event after ``ack_timeout`` s, at most
        ``max_redeliveries`` times, each time to a random live connection (waiting for one)."""
        emu = self.emu
        repushes = 0
        while outbound.ack is None:
            timeout = emu.ack_timeout
            if timeout is None:
                return
            delay = outbound.last_push + timeout - time.monotonic()
            if delay > 0:
                await emu._wait_for(lambda: outbound.ack is not None, delay, quiet=True)
                continue
            if repushes >= emu.max_redeliveries:
                self.undeliverable.append(outbound.event_id)
                emu._notify()
                return
            await emu._wait_for(lambda: bool(self.live_of(outbound.app)), float("inf"))
            if outbound.ack is not None:
                return
            try:
                await self.deliver(outbound, emu._rng.choice(self.live_of(outbound.app)))
            except EmulatorError:
                continue  # the connection died under us: pick another one
            repushes += 1

    # -- connection faults --------------------------------------------------------------------

    def abort(self, live: _Live) -> None:
        live.conn.closed_by = "dropped"
        if live.transport is not None:
            live.transport.abort()

    async def close(self, live: _Live, code: int, message: str) -> None:
        live.conn.closed_by = "server"
        try:
            async with asyncio.timeout(1.0):
                await live.ws.close(code=code, message=message.encode())
        except TimeoutError:
            self.abort(live)

    async def wait_gone(self, targets: list[_Live], timeout: float = 2.0) -> None:
        await self.emu._wait_for(
            lambda: all(not t.conn.live or t.conn.id not in self.live for t in targets), timeout
        )
