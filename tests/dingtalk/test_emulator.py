"""The DingTalk emulator against the protocol (research doc §1-§3), driven by a bare aiohttp client.

These tests never use our driver: they speak the wire protocol directly, so the emulator is checked
against the documented platform, not against the code it is meant to test.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from gateway_dingtalk.emulator import (
    BOT_TOPIC,
    CARD_TOPIC,
    DEFAULT_APP,
    DEFAULT_SECRET,
    DingTalkEmulator,
    EmulatorError,
)
from gateway_dingtalk.emulator.fixture import DEFAULT_TEMPLATE

Factory = Callable[..., Awaitable[DingTalkEmulator]]
TEMPLATE = "tpl.schema"
TEMPLATES = {TEMPLATE: {"content", "flowStatus", "choice", "title"}}
BOT_SUB = {"type": "CALLBACK", "topic": BOT_TOPIC}
CARD_SUB = {"type": "CALLBACK", "topic": CARD_TOPIC}
EVENT_SUB = {"type": "EVENT", "topic": "*"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def emu(dingtalk_emulator_factory: Factory) -> DingTalkEmulator:
    return await dingtalk_emulator_factory(
        templates=TEMPLATES, ack_timeout=0.3, max_redeliveries=2, seed=7
    )


class Client:
    """A minimal Stream client: open, connect, read frames, ack."""

    def __init__(
        self,
        emu: DingTalkEmulator,
        http: aiohttp.ClientSession,
        subscriptions: list[dict[str, str]] | None = None,
        *,
        autoping: bool = True,
    ) -> None:
        self.emu = emu
        self.http = http
        self.subscriptions = subscriptions if subscriptions is not None else [BOT_SUB]
        self.autoping = autoping
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.ticket = ""

    async def open(self) -> dict[str, Any]:
        body = {
            "clientId": DEFAULT_APP,
            "clientSecret": DEFAULT_SECRET,
            "subscriptions": self.subscriptions,
            "ua": "test/1.0",
            "localIp": "127.0.0.1",
        }
        url = self.emu.url + "/v1.0/gateway/connections/open"
        async with self.http.post(url, json=body, headers={"Accept": "application/json"}) as r:
            assert r.status == 200, await r.text()
            return dict(await r.json())

    async def connect(self) -> Client:
        opened = await self.open()
        self.ticket = opened["ticket"]
        self.ws = await self.http.ws_connect(
            f"{opened['endpoint']}?ticket={self.ticket}", autoping=self.autoping
        )
        await self.emu.wait_until(lambda: any(c.id == self.ticket for c in self.emu.connections))
        return self

    async def frame(self, timeout: float = 2.0) -> dict[str, Any]:
        assert self.ws is not None
        while True:
            msg = await self.ws.receive(timeout=timeout)
            if msg.type == aiohttp.WSMsgType.TEXT:
                return dict(json.loads(msg.data))
            if msg.type in (aiohttp.WSMsgType.PING, aiohttp.WSMsgType.PONG):
                continue
            raise ConnectionError(f"no frame: {msg.type}")

    async def no_frame(self, wait: float) -> None:
        with pytest.raises(TimeoutError):
            await self.frame(timeout=wait)

    async def ack(self, frame: dict[str, Any], data: Any = None, code: int = 200) -> None:
        assert self.ws is not None
        payload = {"response": None} if data is None else data
        await self.ws.send_str(
            json.dumps(
                {
                    "code": code,
                    "headers": {
                        "messageId": frame["headers"]["messageId"],
                        "contentType": "application/json",
                    },
                    "message": "OK",
                    "data": json.dumps(payload),
                }
            )
        )

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


async def token(emu: DingTalkEmulator, http: aiohttp.ClientSession) -> str:
    body = {"appKey": DEFAULT_APP, "appSecret": DEFAULT_SECRET}
    async with http.post(emu.url + "/v1.0/oauth2/accessToken", json=body) as r:
        assert r.status == 200
        return str((await r.json())["accessToken"])


async def api(
    emu: DingTalkEmulator,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    body: Any,
    access_token: str | None,
) -> tuple[int, Any]:
    headers = {"x-acs-dingtalk-access-token": access_token} if access_token else {}
    async with http.request(method, emu.url + path, json=body, headers=headers) as r:
        return r.status, await r.json()


def card_body(out_track_id: str, space: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "cardTemplateId": TEMPLATE,
        "outTrackId": out_track_id,
        "callbackType": "STREAM",
        "cardData": {"cardParamMap": {"content": "", "flowStatus": "1"}},
        "openSpaceId": space,
        "imRobotOpenDeliverModel": {"spaceType": "IM_ROBOT"},
        "imGroupOpenDeliverModel": {"robotCode": DEFAULT_APP},
        "userIdType": 1,
    }
    body.update(overrides)
    return body


# -- connections/open and the websocket handshake ----------------------------------------------------


async def test_open_connect_and_single_use_ticket(
    emu: DingTalkEmulator, http: aiohttp.ClientSession
) -> None:
    client = Client(emu, http)
    opened = await client.open()
    assert opened["endpoint"] == emu.url.replace("http", "ws") + "/connect"
    ws = await http.ws_connect(f"{opened['endpoint']}?ticket={opened['ticket']}")
    [conn] = await emu.wait_connected()
    assert conn.id == opened["ticket"]
    assert conn.subscriptions[0].topic == BOT_TOPIC
    assert (conn.ua, conn.local_ip) == ("test/1.0", "127.0.0.1")
    assert emu.connection_opens == 1
    with pytest.raises(aiohttp.WSServerHandshakeError) as reused:
        await http.ws_connect(f"{opened['endpoint']}?ticket={opened['ticket']}")
    assert reused.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as unknown:
        await http.ws_connect(f"{opened['endpoint']}?ticket=nope")
    assert unknown.value.status == 401
    await ws.close()
    await emu.wait_until(lambda: not emu.connections)
    assert emu.connection_history[0].closed_by == "client"


async def test_ticket_expires(
    dingtalk_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await dingtalk_emulator_factory(ticket_ttl=0.1)
    opened = await Client(emu, http).open()
    await asyncio.sleep(0.2)
    with pytest.raises(aiohttp.WSServerHandshakeError) as expired:
        await http.ws_connect(f"{opened['endpoint']}?ticket={opened['ticket']}")
    assert expired.value.status == 401


@pytest.mark.parametrize("secret", ["wrong", None])
async def test_bad_credentials(
    emu: DingTalkEmulator, http: aiohttp.ClientSession, secret: str | None
) -> None:
    body = {"clientId": DEFAULT_APP, "clientSecret": secret, "subscriptions": [BOT_SUB]}
    headers = {"Accept": "application/json"}
    async with http.post(
        emu.url + "/v1.0/gateway/connections/open", json=body, headers=headers
    ) as r:
        answer = await r.json()
    if secret is None:
        assert r.status == 400
    else:
        assert r.status == 401
        assert answer["code"] == "authFailed"
        assert answer["message"] == "鉴权失败"
        assert answer["requestid"]
    assert emu.connection_opens == 0


async def test_subscriptions_required_and_json_only_if_accepted(
    emu: DingTalkEmulator, http: aiohttp.ClientSession
) -> None:
    url = emu.url + "/v1.0/gateway/connections/open"
    body: dict[str, Any] = {"clientId": DEFAULT_APP, "clientSecret": DEFAULT_SECRET}
    async with http.post(url, json=body, headers={"Accept": "application/json"}) as r:
        assert r.status == 400
    body["subscriptions"] = [BOT_SUB]
    async with http.post(url, json=body) as r:  # aiohttp sends Accept: */*
        assert r.status == 200
        assert r.content_type == "application/xml"
        assert "<ticket>" in await r.text()


async def test_refuse_connections(emu: DingTalkEmulator, http: aiohttp.ClientSession) -> None:
    client = Client(emu, http)
    opened = await client.open()
    emu.refuse_connections = True
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(f"{opened['endpoint']}?ticket={opened['ticket']}")
    assert refused.value.status == 503
    with pytest.raises(AssertionError):
        await client.open()
    assert emu.count("/v1.0/gateway/connections/open", status=503) == 1


# -- frames ---------------------------------------------------------------------------------------------


async def test_robot_message_frame_shape(
    emu: DingTalkEmulator, http: aiohttp.ClientSession
) -> None:
    client = await Client(emu, http).connect()
    sent = await emu.send_message(text="你好", sender_staff_id="u7", sender_nick="Seven")
    frame = await client.frame()
    assert frame["specVersion"] == "1.0"
    assert frame["type"] == "CALLBACK"
    headers = frame["headers"]
    assert headers["topic"] == BOT_TOPIC
    assert headers["connectionId"] == client.ticket
    assert headers["messageId"] == sent.frame_id
    assert headers["contentType"] == "application/json"
    assert isinstance(headers["time"], str) and headers["time"].isdigit()
    assert headers["appId"] != DEFAULT_APP  # the unified app id, not the AppKey
    assert isinstance(frame["data"], str)
    data = json.loads(frame["data"])
    assert data == sent.data
    assert data["msgtype"] == "text"
    assert data["text"] == {"content": "你好"}
    assert data["msgId"] == sent.msg_id
    assert isinstance(data["createAt"], int)
    assert data["conversationType"] == "1"
    assert data["conversationId"].startswith("cid")
    assert data["senderId"].startswith("$:LWCP_v1:$")
    assert data["chatbotUserId"].startswith("$:LWCP_v1:$")
    assert (data["senderStaffId"], data["senderNick"]) == ("u7", "Seven")
    assert data["robotCode"] == DEFAULT_APP
    assert data["sessionWebhook"].startswith(emu.url + "/robot/sendBySession?session=")
    assert data["sessionWebhookExpiredTime"] == data["createAt"] + 5_400_000
    assert "isInAtList" not in data and "conversationTitle" not in data


async def test_group_messages(emu: DingTalkEmulator, http: aiohttp.ClientSession) -> None:
    client = await Client(emu, http).connect()
    sent = await emu.send_message(
        text="hi", conversation_type="2", conversation_id="cidG1", conversation_title="Team"
    )
    data = json.loads((await client.frame())["data"])
    assert data["text"]["content"] == " hi"  # the @bot is stripped, its space stays
    assert data["conversationType"] == "2"
    assert data["conversationTitle"] == "Team"
    assert data["isInAtList"] is True
    assert data["atUsers"] == [{"dingtalkId": data["chatbotUserId"]}]
    assert sent.delivered
    unmentioned = await emu.send_message(text="x", conversation_type="2", at_bot=False)
    audio = await emu.send_message(conversation_type="2", msgtype="audio")
    assert not unmentioned.delivered and not audio.delivered
    await client.no_frame(0.2)


@pytest.mark.parametrize(
    ("msgtype", "keys"),
    [
        ("picture", {"pictureDownloadCode", "downloadCode"}),
        ("richText", {"richText"}),
        ("audio", {"duration", "downloadCode", "recognition"}),
        ("video", {"duration", "downloadCode", "videoType"}),
        ("file", {"downloadCode", "fileName", "spaceId", "fileId"}),
        ("unknownMsgType", {"unknownMsgType"}),
    ],
)
async def test_message_types(emu: DingTalkEmulator, msgtype: str, keys: set[str]) -> None:
    data = emu.message(msgtype=msgtype, text="caption")
    assert data["msgtype"] == msgtype
    assert set(data["content"]) == keys
    assert "text" not in data


async def test_quota_exceeded_message(emu: DingTalkEmulator) -> None:
    data = emu.message(text="lost", quota_exceeded=True)
    assert data["errCode"] == 20001 and data["errMsg"]
    assert "text" not in data and "content" not in data


async def test_only_subscribed_topics(emu: DingTalkEmulator, http: aiohttp.ClientSession) -> None:
    await Client(emu, http, [CARD_SUB]).connect()
    with pytest.raises(EmulatorError, match="subscribed"):
        await emu.send_message(wait_connection=0.2)
    with pytest.raises(EmulatorError, match="subscribed"):
        await emu.send_event(wait_connection=0.2)


async def test_no_connection(emu: DingTalkEmulator) -> None:
    with pytest.raises(EmulatorError, match="no live connection"):
        await emu.send_message(wait_connection=0.1)


async def test_send_waits_for_a_connection(
    emu: DingTalkEmulator, http: aiohttp.ClientSession
) -> None:
    sending = asyncio.ensure_future(emu.send_message(wait_connection=3.0))
    await asyncio.sleep(0.1)
    client = await Client(emu, http).connect()
    sent = await sending
    assert (await client.frame())["headers"]["messageId"] == sent.frame_id


# -- keepalive ------------------------------------------------------------------------------------------


async def test_system_ping_and_opaque_check(
    dingtalk_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await dingtalk_emulator_factory(ping_interval=0.1)
    client = await Client(emu, http).connect()
    good = await client.frame()
    assert (good["type"], good["headers"]["topic"]) == ("SYSTEM", "ping")
    assert good["headers"]["connectionId"] == client.ticket
    opaque = json.loads(good["data"])["opaque"]
    await client.ack(good, {"opaque": opaque})
    bad = await client.frame()
    await client.ack(bad, {"opaque": "something else"})
    await emu.wait_until(lambda: len([p for p in emu.pings if p.acked_at]) >= 2)
    assert emu.pings[0].ok and emu.pings[0].opaque == opaque
    assert [p.frame_id for p in emu.ping_mismatches] == [bad["headers"]["messageId"]]
    assert [v.kind for v in emu.violations] == ["opaque_mismatch"]


async def test_websocket_pings_answered_unless_ignored(
    emu: DingTalkEmulator, http: aiohttp.ClientSession
) -> None:
    client = await Client(emu, http, autoping=False).connect()
    assert client.ws is not None
    await client.ws.ping(b"1")
    assert (await client.ws.receive(timeout=1)).type == aiohttp.WSMsgType.PONG
    emu.ignore_ws_pings = True
    await client.ws.ping(b"2")
    with pytest.raises(TimeoutError):
        await client.ws.receive(timeout=0.3)


async def test_stop_pings(dingtalk_emulator_factory: Factory, http: aiohttp.ClientSession) -> None:
    emu = await dingtalk_emulator_factory(ping_interval=0.05)
    client = await Client(emu, http, autoping=False).connect()
    await client.frame()
    emu.stop_pings()
    await asyncio.sleep(0.1)  # a ping already on the wire may still arrive
    while True:
        try:
            await client.frame(timeout=0.05)
        except TimeoutError:
            break
    await client.no_frame(0.3)
    assert client.ws is not None
    await client.ws.ping()
    with pytest.raises(TimeoutError):
        await client.ws.receive(timeout=0.2)
    emu.resume_pings()
    assert (await client.frame())["headers"]["topic"] == "ping"


async def test_disconnect_then_tcp_close(
    emu: DingTalkEmulator, http: aiohttp.ClientSession
) -> None:
    client = await Client(emu, http).connect()
    [conn_id] = await emu.send_disconnect(close_after=0.3)
    frame = await client.frame()
    assert (frame["type"], frame["headers"]["topic"]) == ("SYSTEM", "disconnect")
    assert json.loads(frame["data"]) == {"reason": "persistent connection is timeout"}
    assert "connectionId" not in frame["headers"] and "appId" not in frame["headers"]
    assert emu.connections[0].draining
    with pytest.raises(EmulatorError):  # nothing is routed to a draining connection
        await emu.send_message(wait_connection=0.1)
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        await client.frame(timeout=2)
    assert 0.1 < time.monotonic() - started < 1.5
    await emu.wait_until(lambda: not emu.connections)
    [closed] = emu.connection_history
    assert (closed.id, closed.closed_by) == (conn_id, "disconnect-timeout")


async def test_disconnect_client_closes_first(
    emu: DingTalkEmulator, http: aiohttp.ClientSession
) -> None:
    client = await Client(emu, http).connect()
    await emu.send_disconnect(close_after=5)
    frame = await client.frame()
    await client.ack(frame, json.loads(frame["data"]))
    await client.close()
    await emu.wait_until(lambda: not emu.connections)
    assert emu.connection_history[0].closed_by == "client"
    assert emu.acks[-1].topic == "disconnect"


async def test_drop_and_close_connections(
    emu: DingTalkEmulator, http: aiohttp.ClientSession
) -> None:
    client = await Client(emu, http).connect()
    assert await emu.drop_connections() == 1
    with pytest.raises(ConnectionError):
        await client.frame()
    assert emu.connection_history[-1].closed_by == "dropped"
    client2 = await Client(emu, http).connect()
    reading = asyncio.ensure_future(client2.frame())
    assert await emu.close_connections(code=1011, message="boom") == 1
    with pytest.raises(ConnectionError):
        await reading
    assert client2.ws is not None and client2.ws.close_code == 1011  # a complete close handshake
    assert emu.connection_history[-1].close_code == 1011


async def test_close_is_prompt(
    dingtalk_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await dingtalk_emulator_factory()
    client = await Client(emu, http, autoping=False).connect()
    started = time.monotonic()
    await emu.close()
    assert time.monotonic() - started < 2.5
    with pytest.raises(ConnectionError):
        await client.frame()


# -- acks and redelivery --------------------------------------------------------------------------------


async def test_redelivery_same_msg_id_new_frame_id(
    emu: DingTalkEmulator, http: aiohttp.ClientSession
) -> None:
    client = await Client(emu, http).connect()
    sent = await emu.send_message(text="again")
    frames = [await client.frame() for _ in range(3)]  # first push + max_redeliveries
    await client.no_frame(0.5)
    assert {json.loads(f["data"])["msgId"] for f in frames} == {sent.msg_id}
    assert len({f["data"] for f in frames}) == 1
    assert len({f["headers"]["messageId"] for f in frames}) == 3
    assert emu.deliveries(sent.msg_id) == 3
    assert not emu.acked(sent.msg_id)


async def test_redelivery_keeping_frame_id(
    dingtalk_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await dingtalk_emulator_factory(
        ack_timeout=0.2, max_redeliveries=1, redeliver_new_frame_id=False
    )
    client = await Client(emu, http).connect()
    sent = await emu.send_message()
    first, second = await client.frame(), await client.frame()
    assert first["headers"]["messageId"] == second["headers"]["messageId"] == sent.frame_id
    await client.ack(second)
    assert (await emu.wait_acked(sent.msg_id)).frame_id == sent.frame_id


async def test_no_redelivery_when_acked(emu: DingTalkEmulator, http: aiohttp.ClientSession) -> None:
    client = await Client(emu, http).connect()
    sent = await emu.send_message()
    frame = await client.frame()
    await client.ack(frame)
    ack = await emu.wait_acked(sent.msg_id)
    assert (ack.frame_id, ack.msg_id, ack.connection_id) == (
        sent.frame_id,
        sent.msg_id,
        client.ticket,
    )
    assert (ack.code, ack.data) == (200, {"response": None})
    assert ack is await emu.wait_acked(sent.frame_id)
    await client.no_frame(0.6)
    assert emu.deliveries(sent.msg_id) == 1
    assert not emu.violations


async def test_failed_ack_is_redelivered(
    emu: DingTalkEmulator, http: aiohttp.ClientSession
) -> None:
    client = await Client(emu, http).connect()
    sent = await emu.send_message()
    await client.ack(await client.frame(), code=500)
    again = await client.frame()
    assert json.loads(again["data"])["msgId"] == sent.msg_id
    await client.ack(again)
    assert (await emu.wait_acked(sent.msg_id)).frame_id == again["headers"]["messageId"]


async def test_manual_redelivery(emu: DingTalkEmulator, http: aiohttp.ClientSession) -> None:
    client = await Client(emu, http).connect()
    sent = await emu.send_message()
    await client.ack(await client.frame())
    await emu.wait_acked(sent.msg_id)
    again = await emu.redeliver(sent.msg_id)
    frame = await client.frame()
    assert frame["headers"]["messageId"] == again.frame_id != sent.frame_id
    assert json.loads(frame["data"]) == sent.data
    await client.ack(frame)
    await emu.wait_acked(again.frame_id)
    assert emu.deliveries(sent.msg_id) == 2


async def test_misrouted_ack_does_not_count(
    emu: DingTalkEmulator, http: aiohttp.ClientSession
) -> None:
    one = await Client(emu, http).connect()
    two = await Client(emu, http).connect()
    sent = await emu.send_message(connection=one.ticket)
    frame = await one.frame()
    await two.ack(frame)  # the SDK 0.24.3 bug: acking on the current, not the source, socket
    await emu.wait_until(lambda: bool(emu.misrouted_acks))
    assert emu.misrouted_acks[0].connection_id == two.ticket
    assert emu.violations[0].kind == "misrouted_ack"
    assert not emu.acked(sent.msg_id)
    await one.ack(frame)
    assert (await emu.wait_acked(sent.msg_id)).connection_id == one.ticket


async def test_unknown_and_duplicate_and_bad_acks(
    emu: DingTalkEmulator, http: aiohttp.ClientSession
) -> None:
    client = await Client(emu, http).connect()
    await emu.send_message()
    frame = await client.frame()
    await client.ack(frame)
    await client.ack(frame)
    await client.ack({"headers": {"messageId": "nope"}})
    assert client.ws is not None
    await client.ws.send_str("not json")
    await client.ws.send_bytes(b"\x00")
    kinds = ["duplicate_ack", "unknown_ack", "bad_frame", "binary_frame"]
    await emu.wait_until(lambda: len(emu.violations) == 4)
    assert [v.kind for v in emu.violations] == kinds


async def test_redelivery_may_go_to_another_connection(
    dingtalk_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await dingtalk_emulator_factory(ack_timeout=0.2, max_redeliveries=1)
    one = await Client(emu, http).connect()
    sent = await emu.send_message(connection=one.ticket)
    await one.frame()
    await one.close()
    two = await Client(emu, http).connect()
    frame = await two.frame()
    assert json.loads(frame["data"])["msgId"] == sent.msg_id
    await two.ack(frame)
    assert (await emu.wait_acked(sent.msg_id)).connection_id == two.ticket


async def test_events(emu: DingTalkEmulator, http: aiohttp.ClientSession) -> None:
    client = await Client(emu, http, [EVENT_SUB]).connect()
    sent = await emu.send_event(event_type="user_add_org", data={"userId": ["u1"]})
    frame = await client.frame()
    assert frame["type"] == "EVENT"
    headers = frame["headers"]
    assert (headers["eventType"], headers["eventId"]) == ("user_add_org", sent.msg_id)
    assert headers["eventBornTime"].isdigit()
    await client.ack(frame, {"status": "LATER"})  # retry later
    again = await client.frame()
    await client.ack(again, {"status": "SUCCESS", "message": "success"})
    assert (await emu.wait_acked(sent.msg_id)).frame_id == again["headers"]["messageId"]


async def test_push_raw_frame(emu: DingTalkEmulator, http: aiohttp.ClientSession) -> None:
    client = await Client(emu, http).connect()
    assert await emu.push_frame(None, "{not json") == client.ticket
    assert client.ws is not None
    assert (await client.ws.receive(timeout=1)).data == "{not json"
    raw = {
        "specVersion": "1.0",
        "type": "CALLBACK",
        "headers": {"messageId": "m1", "topic": "x"},
        "data": "{}",
    }
    await emu.push_frame(None, raw)
    await client.ack(await client.frame())
    assert (await emu.wait_acked("m1")).topic == "x"


# -- distribution -----------------------------------------------------------------------------------------


async def test_distribution_random(emu: DingTalkEmulator, http: aiohttp.ClientSession) -> None:
    clients = [await Client(emu, http).connect() for _ in range(2)]
    sent = [await emu.send_message(text=str(i)) for i in range(20)]
    by_connection = {c.ticket: 0 for c in clients}
    for message in sent:
        by_connection[message.connection_id] += 1
    assert sum(by_connection.values()) == 20  # one connection per push, never a fan-out
    assert all(count > 0 for count in by_connection.values())


async def test_distribution_newest(
    dingtalk_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await dingtalk_emulator_factory(distribution="newest")
    old = await Client(emu, http).connect()
    new = await Client(emu, http).connect()
    with pytest.raises(ConnectionError):
        await old.frame()
    assert [c.id for c in emu.connections] == [new.ticket]
    assert emu.connection_history[0].closed_by == "replaced"


async def test_distribution_reject(
    dingtalk_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await dingtalk_emulator_factory(distribution="reject")
    first = await Client(emu, http).connect()
    second = Client(emu, http)
    with pytest.raises(AssertionError, match="authFailed"):
        await second.open()
    await first.close()
    await emu.wait_until(lambda: not emu.connections)
    await second.connect()


# -- access tokens ----------------------------------------------------------------------------------------


async def test_token_flow(dingtalk_emulator_factory: Factory, http: aiohttp.ClientSession) -> None:
    emu = await dingtalk_emulator_factory(token_ttl=0.3)
    url = emu.url + "/v1.0/oauth2/accessToken"
    async with http.post(url, json={"appKey": DEFAULT_APP, "appSecret": "bad"}) as r:
        assert (r.status, (await r.json())["code"]) == (400, "invalidClientIdOrSecret")
    async with http.post(url, json={"appKey": DEFAULT_APP, "appSecret": DEFAULT_SECRET}) as r:
        answer = await r.json()
    assert answer["expireIn"] == 1  # ceil(0.3)
    first = answer["accessToken"]
    assert await token(emu, http) == first  # the same token within its lifetime

    path = "/v1.0/card/instances"
    status, error = await api(emu, http, "PUT", path, {"outTrackId": "x"}, None)
    assert (status, error["code"]) == (400, "AuthenticationFailed.MissingParameter")
    status, error = await api(emu, http, "PUT", path, {"outTrackId": "x"}, "made-up")
    assert (status, error["code"], error["message"]) == (
        400,
        "InvalidAuthentication",
        "不合法的access_token",
    )
    status, error = await api(emu, http, "PUT", path, {"outTrackId": "x"}, first)
    assert (status, error["code"]) == (400, "param.cardNotExist")  # authenticated
    await asyncio.sleep(0.35)
    status, error = await api(emu, http, "PUT", path, {"outTrackId": "x"}, first)
    assert (status, error["code"]) == (400, "InvalidAuthentication")
    fresh = await token(emu, http)
    assert fresh != first
    emu.expire_tokens()
    emu.expired_token_status = 401
    status, error = await api(emu, http, "PUT", path, {"outTrackId": "x"}, fresh)
    assert (status, error["code"]) == (401, "InvalidAuthentication")


# -- cards ------------------------------------------------------------------------------------------------


@pytest.fixture
async def tok(emu: DingTalkEmulator, http: aiohttp.ClientSession) -> str:
    emu.message(sender_staff_id="u1")  # u1 talked to the bot: IM_ROBOT.u1 is a valid space
    emu.message(conversation_type="2", conversation_id="cidGroup", sender_staff_id="u2")
    return await token(emu, http)


CREATE = "/v1.0/card/instances/createAndDeliver"
STREAM = "/v1.0/card/streaming"


async def test_create_and_deliver(
    emu: DingTalkEmulator, http: aiohttp.ClientSession, tok: str
) -> None:
    status, answer = await api(
        emu, http, "POST", CREATE, card_body("c1", "dtv1.card//IM_ROBOT.u1"), tok
    )
    assert status == 200, answer
    assert answer["success"] is True
    assert answer["result"]["outTrackId"] == "c1"
    [result] = answer["result"]["deliverResults"]
    assert (result["spaceType"], result["spaceId"], result["success"]) == ("IM_ROBOT", "u1", True)
    card = emu.cards["c1"]
    assert (card.template_id, card.status, card.callback_type) == (TEMPLATE, "processing", "STREAM")
    assert card.param_map == {"content": "", "flowStatus": "1"}
    assert card.space == "dtv1.card//IM_ROBOT.u1"
    assert card.robot_code == DEFAULT_APP
    group = card_body("c2", "dtv1.card//IM_GROUP.cidGroup")
    assert (await api(emu, http, "POST", CREATE, group, tok))[0] == 200


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"cardData": {"cardParamMap": {"flowStatus": 1}}}, "param.cardParamMapValueNotString"),
        ({"cardData": {"cardParamMap": {"nope": "x"}}}, "param.cardParamMapKeyNotInTemplate"),
        ({"cardTemplateId": "missing.schema"}, "param.templateNotExist"),
        ({"outTrackId": ""}, "param.outTrackIdEmpty"),
        ({"callbackType": "WEBHOOK"}, "param.callbackTypeInvalid"),
        ({"openSpaceId": "IM_ROBOT.u1"}, "param.openSpaceIdInvalid"),
        ({"openSpaceId": "dtv1.card//IM_ROBOT.stranger"}, "param.openSpaceIdInvalid"),
        ({"openSpaceId": "dtv1.card//IM_GROUP.cidUnknown"}, "param.openSpaceIdInvalid"),
        ({"openSpaceId": "dtv1.card//IM_SINGLE.x"}, "param.openSpaceIdInvalid"),
        (
            {
                "openSpaceId": "dtv1.card//IM_GROUP.cidGroup",
                "imGroupOpenDeliverModel": {"robotCode": "other"},
            },
            "param.robotCodeInvalid",
        ),
        (
            {"openSpaceId": "dtv1.card//IM_GROUP.cidGroup", "imGroupOpenDeliverModel": None},
            "param.imGroupOpenDeliverModelEmpty",
        ),
        ({"imRobotOpenDeliverModel": None}, "param.imRobotOpenDeliverModelEmpty"),
        ({"userIdType": 3}, "param.userIdTypeInvalid"),
    ],
)
async def test_create_and_deliver_validation(
    emu: DingTalkEmulator,
    http: aiohttp.ClientSession,
    tok: str,
    overrides: dict[str, Any],
    code: str,
) -> None:
    body = card_body("c1", "dtv1.card//IM_ROBOT.u1", **overrides)
    status, answer = await api(emu, http, "POST", CREATE, body, tok)
    assert (status, answer["code"]) == (400, code), answer
    assert set(answer) == {"code", "message", "requestid"}
    assert not emu.cards


async def test_duplicate_out_track_id(
    emu: DingTalkEmulator, http: aiohttp.ClientSession, tok: str
) -> None:
    body = card_body("c1", "dtv1.card//IM_ROBOT.u1")
    assert (await api(emu, http, "POST", CREATE, body, tok))[0] == 200
    status, answer = await api(emu, http, "POST", CREATE, body, tok)
    assert (status, answer["code"]) == (400, "param.cardAlreadyExist")


async def test_two_step_create_and_deliver(
    emu: DingTalkEmulator, http: aiohttp.ClientSession, tok: str
) -> None:
    body = card_body("c1", "")
    del body["openSpaceId"]
    status, answer = await api(emu, http, "POST", "/v1.0/card/instances", body, tok)
    assert (status, answer) == (200, {"success": True, "result": "c1"})
    assert emu.cards["c1"].spaces == []
    deliver = {
        "outTrackId": "c1",
        "userIdType": 1,
        "openSpaceId": "dtv1.card//IM_GROUP.cidGroup",
        "imGroupOpenDeliverModel": {"robotCode": DEFAULT_APP},
    }
    status, answer = await api(emu, http, "POST", "/v1.0/card/instances/deliver", deliver, tok)
    assert status == 200 and answer["result"][0]["spaceId"] == "cidGroup"
    assert emu.cards["c1"].spaces == ["dtv1.card//IM_GROUP.cidGroup"]
    deliver["outTrackId"] = "missing"
    status, answer = await api(emu, http, "POST", "/v1.0/card/instances/deliver", deliver, tok)
    assert (status, answer["code"]) == (400, "param.cardNotExist")


async def test_update_card_merge_and_replace(
    emu: DingTalkEmulator, http: aiohttp.ClientSession, tok: str
) -> None:
    await api(emu, http, "POST", CREATE, card_body("c1", "dtv1.card//IM_ROBOT.u1"), tok)
    path = "/v1.0/card/instances"
    merge = {
        "outTrackId": "c1",
        "cardData": {"cardParamMap": {"flowStatus": "2"}},
        "cardUpdateOptions": {"updateCardDataByKey": True},
    }
    assert await api(emu, http, "PUT", path, merge, tok) == (200, {"success": True, "result": True})
    assert emu.cards["c1"].param_map == {"content": "", "flowStatus": "2"}
    replace = {"outTrackId": "c1", "cardData": {"cardParamMap": {"title": "T"}}}
    assert (await api(emu, http, "PUT", path, replace, tok))[0] == 200
    assert emu.cards["c1"].param_map == {"title": "T"}
    assert [u.source for u in emu.cards["c1"].history] == ["create", "update", "update"]
    status, answer = await api(emu, http, "PUT", path, {"outTrackId": "c1"}, tok)
    assert (status, answer["code"]) == (400, "param.cardDataAndPrivateDataBothEmpty")
    bad = {"outTrackId": "c1", "cardData": {"cardParamMap": {"title": ["x"]}}}
    assert (await api(emu, http, "PUT", path, bad, tok))[1][
        "code"
    ] == "param.cardParamMapValueNotString"
    gone = {"outTrackId": "zz", "cardData": {"cardParamMap": {"title": "x"}}}
    assert (await api(emu, http, "PUT", path, gone, tok))[1]["code"] == "param.cardNotExist"


def stream_body(content: str, guid: str = "", **overrides: Any) -> dict[str, Any]:
    body = {
        "outTrackId": "c1",
        "guid": guid or uuid.uuid4().hex,
        "key": "content",
        "content": content,
        "isFull": True,
        "isFinalize": False,
        "isError": False,
    }
    body.update(overrides)
    return body


async def test_streaming_states_and_guid(
    emu: DingTalkEmulator, http: aiohttp.ClientSession, tok: str
) -> None:
    await api(emu, http, "POST", CREATE, card_body("c1", "dtv1.card//IM_ROBOT.u1"), tok)
    card = emu.cards["c1"]
    assert card.status == "processing"
    assert await api(emu, http, "PUT", STREAM, stream_body("Hel", "g1"), tok) == (
        200,
        {"success": True, "result": True},
    )
    assert (card.status, card.content["content"]) == ("streaming", "Hel")
    assert (await api(emu, http, "PUT", STREAM, stream_body("Hello", "g2"), tok))[0] == 200
    # a retry of g1 (same guid) is answered but not applied again
    assert (await api(emu, http, "PUT", STREAM, stream_body("Hel", "g1"), tok))[0] == 200
    assert card.content["content"] == "Hello"
    assert card.streaming_calls == 2
    final = stream_body("Hello!", "g3", isFinalize=True)
    assert (await api(emu, http, "PUT", STREAM, final, tok))[0] == 200
    assert (card.status, card.param_map["content"]) == ("finished", "Hello!")
    assert (await api(emu, http, "PUT", STREAM, final, tok))[0] == 200  # retried finalize
    status, answer = await api(emu, http, "PUT", STREAM, stream_body("more", "g4"), tok)
    assert (status, answer["code"]) == (400, "param.stream.cardFinished")
    assert [v.kind for v in emu.violations] == ["stream_after_end"]
    assert card.content["content"] == "Hello!"


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"isFull": False}, "param.stream.isFull"),
        ({"key": "nope"}, "param.stream.keyNotExist"),
        ({"key": ""}, "param.stream.keyEmpty"),
        ({"guid": ""}, "param.stream.guidEmpty"),
        ({"content": ""}, "param.stream.contentEmpty"),
        ({"outTrackId": "missing"}, "param.stream.outTrackId"),
    ],
)
async def test_streaming_validation(
    emu: DingTalkEmulator,
    http: aiohttp.ClientSession,
    tok: str,
    overrides: dict[str, Any],
    code: str,
) -> None:
    await api(emu, http, "POST", CREATE, card_body("c1", "dtv1.card//IM_ROBOT.u1"), tok)
    body = dict(stream_body("x"), **overrides)
    status, answer = await api(emu, http, "PUT", STREAM, body, tok)
    assert (status, answer["code"]) == (400, code)
    assert emu.cards["c1"].status == "processing"


async def test_streaming_error_and_size_limit(
    emu: DingTalkEmulator, http: aiohttp.ClientSession, tok: str
) -> None:
    await api(emu, http, "POST", CREATE, card_body("c1", "dtv1.card//IM_ROBOT.u1"), tok)
    emu.max_stream_content_bytes = 10
    status, answer = await api(emu, http, "PUT", STREAM, stream_body("x" * 11), tok)
    assert (status, answer["code"], answer["message"]) == (
        400,
        "param.stream.content",
        "content is too large",
    )
    failed = stream_body("sorry", isError=True)
    assert (await api(emu, http, "PUT", STREAM, failed, tok))[0] == 200
    assert emu.cards["c1"].status == "failed"


async def test_card_concurrency(
    emu: DingTalkEmulator, http: aiohttp.ClientSession, tok: str
) -> None:
    await api(emu, http, "POST", CREATE, card_body("c1", "dtv1.card//IM_ROBOT.u1"), tok)
    emu.card_latency = 0.2
    both = await asyncio.gather(
        api(emu, http, "PUT", STREAM, stream_body("a"), tok),
        api(emu, http, "PUT", STREAM, stream_body("ab"), tok),
    )
    assert [status for status, _ in both] == [200, 200]
    [concurrent] = emu.concurrent_card_updates
    assert (concurrent.out_track_id, concurrent.rejected) == ("c1", False)
    emu.strict_card_concurrency = True
    both = await asyncio.gather(
        api(emu, http, "PUT", STREAM, stream_body("abc"), tok),
        api(emu, http, "PUT", STREAM, stream_body("abcd"), tok),
    )
    assert sorted(status for status, _ in both) == [200, 403]
    assert emu.concurrent_card_updates[-1].rejected


async def test_legacy_interactive_cards(
    emu: DingTalkEmulator, http: aiohttp.ClientSession, tok: str
) -> None:
    send = "/v1.0/im/v1.0/robot/interactiveCards/send"
    body = {
        "cardTemplateId": "StandardCard",
        "singleChatReceiver": json.dumps({"userId": "u1"}),
        "cardBizId": "biz1",
        "robotCode": DEFAULT_APP,
        "cardData": json.dumps({"header": {"title": "t"}}),
    }
    status, answer = await api(emu, http, "POST", send, body, tok)
    assert (status, set(answer)) == (200, {"processQueryKey"})
    card = emu.cards["biz1"]
    assert card.legacy and card.param_map == {"header": {"title": "t"}}
    both = dict(body, cardBizId="biz2", openConversationId="cidGroup")
    assert (await api(emu, http, "POST", send, both, tok))[1]["code"] == "param.error"
    not_string = dict(body, cardBizId="biz3", cardData={"a": 1})
    assert (await api(emu, http, "POST", send, not_string, tok))[1]["code"] == "param.error"
    update = {
        "cardBizId": "biz1",
        "cardData": json.dumps({"body": "b"}),
        "updateOptions": {"updateCardDataByKey": True},
    }
    assert (await api(emu, http, "PUT", "/v1.0/im/robots/interactiveCards", update, tok))[0] == 200
    assert card.param_map == {"header": {"title": "t"}, "body": "b"}
    with pytest.raises(EmulatorError, match="STREAM"):
        await emu.click_card(None, "biz1", "u1")


# -- card callbacks ---------------------------------------------------------------------------------------


async def test_click_card_applies_the_ack(
    emu: DingTalkEmulator, http: aiohttp.ClientSession, tok: str
) -> None:
    client = await Client(emu, http, [BOT_SUB, CARD_SUB]).connect()
    await api(emu, http, "POST", CREATE, card_body("c1", "dtv1.card//IM_ROBOT.u1"), tok)

    async def user_clicks() -> Any:
        return await emu.click_card(None, "c1", "u1", {"action": "up"}, ["like"])

    clicking = asyncio.ensure_future(user_clicks())
    frame = await client.frame()
    assert (frame["type"], frame["headers"]["topic"]) == ("CALLBACK", CARD_TOPIC)
    data = json.loads(frame["data"])
    assert (data["type"], data["outTrackId"], data["userId"]) == ("actionCallback", "c1", "u1")
    assert isinstance(data["content"], str) and isinstance(data["extension"], str)
    assert json.loads(data["content"]) == {
        "cardPrivateData": {"actionIds": ["like"], "params": {"action": "up"}}
    }
    response = {
        "cardData": {"cardParamMap": {"choice": "up"}},
        "cardUpdateOptions": {"updateCardDataByKey": True},
    }
    await client.ack(frame, {"response": response})
    assert await clicking == response
    card = emu.cards["c1"]
    assert card.param_map == {"content": "", "flowStatus": "1", "choice": "up"}
    assert card.history[-1].source == "callback"
    [click] = emu.card_clicks
    assert click.within_limit and click.applied


async def test_click_card_without_ack_or_subscription(
    emu: DingTalkEmulator, http: aiohttp.ClientSession, tok: str
) -> None:
    await api(emu, http, "POST", CREATE, card_body("c1", "dtv1.card//IM_ROBOT.u1"), tok)
    await api(
        emu,
        http,
        "POST",
        CREATE,
        card_body("c2", "dtv1.card//IM_ROBOT.u1", callbackType="HTTP"),
        tok,
    )
    client = await Client(emu, http).connect()
    with pytest.raises(EmulatorError, match="subscribed"):
        await emu.click_card(None, "c1", "u1", wait_connection=0.1)
    with pytest.raises(EmulatorError, match="STREAM"):
        await emu.click_card(None, "c2", "u1")
    with pytest.raises(EmulatorError, match="no card"):
        await emu.click_card(None, "c9", "u1")
    await client.close()
    late = await Client(emu, http, [CARD_SUB]).connect()
    emu.card_callback_limit = 0.1  # DingTalk's is 2 s; shortened to keep the test fast
    assert await emu.click_card(None, "c1", "u1", {"a": "b"}, timeout=0.2) is None
    await late.ack(
        await late.frame(), {"response": {"cardData": {"cardParamMap": {"choice": "x"}}}}
    )
    await emu.wait_until(lambda: any(v.kind == "late_card_ack" for v in emu.violations), 3)
    [click] = emu.card_clicks
    assert not click.within_limit and not click.applied
    assert "choice" not in emu.cards["c1"].param_map


async def test_click_card_bad_response_is_not_applied(
    emu: DingTalkEmulator, http: aiohttp.ClientSession, tok: str
) -> None:
    client = await Client(emu, http, [CARD_SUB]).connect()
    await api(emu, http, "POST", CREATE, card_body("c1", "dtv1.card//IM_ROBOT.u1"), tok)
    clicking = asyncio.ensure_future(emu.click_card(None, "c1", "u1"))
    frame = await client.frame()
    await client.ack(frame, {"response": {"cardData": {"cardParamMap": {"choice": 1}}}})
    await clicking
    assert emu.violations[-1].kind == "bad_card_response"
    assert emu.cards["c1"].param_map == {"content": "", "flowStatus": "1"}


# -- faults -------------------------------------------------------------------------------------------------


async def test_fail_next(emu: DingTalkEmulator, http: aiohttp.ClientSession, tok: str) -> None:
    await api(emu, http, "POST", CREATE, card_body("c1", "dtv1.card//IM_ROBOT.u1"), tok)
    emu.fail_next(STREAM, count=2)
    emu.fail_next(STREAM, status=403)
    emu.fail_next("/v1.0/robot/", status=400)
    first = await api(emu, http, "PUT", STREAM, stream_body("a"), tok)
    second = await api(emu, http, "PUT", STREAM, stream_body("a"), tok)
    third = await api(emu, http, "PUT", STREAM, stream_body("a"), tok)
    for status, answer in (first, second):
        assert (status, answer["code"], answer["message"]) == (500, "unknownError", "未知错误")
    assert (third[0], third[1]["code"]) == (403, "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi")
    assert (await api(emu, http, "PUT", STREAM, stream_body("a"), tok))[0] == 200
    assert emu.count(STREAM) == 4
    assert emu.count(STREAM, status=500) == 2
    assert emu.calls[-1].app == DEFAULT_APP


async def test_qps_limit(emu: DingTalkEmulator, http: aiohttp.ClientSession, tok: str) -> None:
    await api(emu, http, "POST", CREATE, card_body("c1", "dtv1.card//IM_ROBOT.u1"), tok)
    emu.qps_limit = 2
    results = [await api(emu, http, "PUT", STREAM, stream_body(str(i)), tok) for i in range(4)]
    assert [status for status, _ in results] == [200, 200, 403, 403]
    assert results[2][1]["code"] == "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"
    assert sum(emu.rejections.values()) == 2
    # the window is per API: another API of the same app is not limited
    assert (
        await api(
            emu,
            http,
            "PUT",
            "/v1.0/card/instances",
            {"outTrackId": "c1", "cardData": {"cardParamMap": {"title": "t"}}},
            tok,
        )
    )[0] == 200
    await asyncio.sleep(1.0)
    assert (await api(emu, http, "PUT", STREAM, stream_body("later"), tok))[0] == 200


async def test_latency(emu: DingTalkEmulator, http: aiohttp.ClientSession) -> None:
    emu.latency = 0.2
    started = time.monotonic()
    await token(emu, http)
    assert time.monotonic() - started >= 0.2


# -- session webhook, proactive sends, files ----------------------------------------------------------


async def test_session_webhook(emu: DingTalkEmulator, http: aiohttp.ClientSession) -> None:
    data = emu.message(text="q", sender_staff_id="u5", session_webhook_ttl=0.3)
    reply = {"msgtype": "text", "text": {"content": "answer"}, "at": {"atUserIds": ["u5"]}}
    async with http.post(data["sessionWebhook"], json=reply) as r:
        assert (r.status, await r.json()) == (200, {"errcode": 0, "errmsg": "ok"})
    markdown = {"msgtype": "markdown", "markdown": {"title": "T", "text": "**b**"}}
    async with http.post(data["sessionWebhook"], json=markdown) as r:
        assert (await r.json())["errcode"] == 0
    first, second = emu.replies(data["msgId"])
    assert (first.via, first.msgtype, first.text, first.user_id) == (
        "session",
        "text",
        "answer",
        "u5",
    )
    assert first.at == {"atUserIds": ["u5"]}
    assert first.conversation_id == data["conversationId"]
    assert (second.msgtype, second.title, second.text) == ("markdown", "T", "**b**")
    await asyncio.sleep(0.35)
    async with http.post(data["sessionWebhook"], json=reply) as r:
        answer = await r.json()
    assert r.status == 200 and answer["errcode"] == 300001
    async with http.post(emu.url + "/robot/sendBySession?session=nope", json=reply) as r:
        assert (await r.json())["errcode"] == 300001
    assert len(emu.sent) == 2


async def test_session_webhook_fault(emu: DingTalkEmulator, http: aiohttp.ClientSession) -> None:
    data = emu.message()
    emu.fail_next("/robot/sendBySession", status=200, code="410100", message="发送速度太快而限流")
    reply = {"msgtype": "text", "text": {"content": "a"}}
    async with http.post(data["sessionWebhook"], json=reply) as r:
        assert (r.status, await r.json()) == (
            200,
            {"errcode": 410100, "errmsg": "发送速度太快而限流"},
        )
    async with http.post(data["sessionWebhook"], json={"msgtype": "bogus"}) as r:
        assert (await r.json())["errcode"] == 400105
    assert not emu.sent


async def test_proactive_sends(
    emu: DingTalkEmulator, http: aiohttp.ClientSession, tok: str
) -> None:
    group = {
        "msgKey": "sampleMarkdown",
        "msgParam": json.dumps({"title": "T", "text": "hello"}),
        "openConversationId": "cidGroup",
        "robotCode": DEFAULT_APP,
    }
    status, answer = await api(emu, http, "POST", "/v1.0/robot/groupMessages/send", group, tok)
    assert status == 200 and answer["processQueryKey"]
    [sent] = emu.sent
    assert (sent.via, sent.conversation_id, sent.msgtype, sent.text) == (
        "group",
        "cidGroup",
        "markdown",
        "hello",
    )
    too_long = dict(group, msgParam=json.dumps({"title": "T", "text": "x" * 15001}))
    answer = (await api(emu, http, "POST", "/v1.0/robot/groupMessages/send", too_long, tok))[1]
    assert answer["code"] == "invalidParameter.msgParam.tooLong"
    batch = {
        "robotCode": DEFAULT_APP,
        "userIds": ["u1", "ghost"],
        "msgKey": "sampleText",
        "msgParam": json.dumps({"content": "ping"}),
    }
    status, answer = await api(emu, http, "POST", "/v1.0/robot/oToMessages/batchSend", batch, tok)
    assert status == 200
    assert (answer["invalidStaffIdList"], answer["flowControlledStaffIdList"]) == (["ghost"], [])
    assert (emu.sent[-1].via, emu.sent[-1].user_id, emu.sent[-1].text) == ("otm", "u1", "ping")
    batch["userIds"] = [f"u{i}" for i in range(21)]
    assert (await api(emu, http, "POST", "/v1.0/robot/oToMessages/batchSend", batch, tok))[0] == 400


async def test_file_download(emu: DingTalkEmulator, http: aiohttp.ClientSession, tok: str) -> None:
    data = emu.message(msgtype="file", attachment=b"%PDF-1.4", file_name="a.pdf")
    body = {"downloadCode": data["content"]["downloadCode"], "robotCode": DEFAULT_APP}
    status, answer = await api(emu, http, "POST", "/v1.0/robot/messageFiles/download", body, tok)
    assert status == 200
    async with http.get(answer["downloadUrl"]) as r:
        assert (r.status, await r.read()) == (200, b"%PDF-1.4")
    picture = emu.message(msgtype="picture")
    body["downloadCode"] = picture["content"]["downloadCode"]
    answer = (await api(emu, http, "POST", "/v1.0/robot/messageFiles/download", body, tok))[1]
    async with http.get(answer["downloadUrl"]) as r:
        assert (await r.read()).startswith(b"\x89PNG")
    body["downloadCode"] = "unknown"
    status, answer = await api(emu, http, "POST", "/v1.0/robot/messageFiles/download", body, tok)
    assert (status, answer["code"]) == (400, "invalidParameter.downloadCode")
    body["robotCode"] = "someone-else"
    answer = (await api(emu, http, "POST", "/v1.0/robot/messageFiles/download", body, tok))[1]
    assert answer["code"] == "invalidParameter.robotCode.auth"


async def test_unknown_api_is_recorded(emu: DingTalkEmulator, http: aiohttp.ClientSession) -> None:
    async with http.post(emu.url + "/v1.0/nope", json={}) as r:
        assert r.status == 404
    assert emu.count("/v1.0/nope", status=404) == 1


async def test_default_fixture(
    dingtalk_emulator: DingTalkEmulator, http: aiohttp.ClientSession
) -> None:
    assert DEFAULT_TEMPLATE in dingtalk_emulator.templates
    assert dingtalk_emulator.url.startswith("http://127.0.0.1:")
    await Client(dingtalk_emulator, http).connect()
    assert len(dingtalk_emulator.connections) == 1
