"""The Feishu emulator on its own: long connection, tenant token, IM messages, CardKit, faults.

A raw client built from aiohttp and ``gateway_feishu._frames`` plays the bot side, so every
assertion is about bytes on the wire and HTTP answers.  Loopback only; timeouts are short.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlparse

import aiohttp
import pytest

from gateway_feishu._frames import CONTROL, DATA, Frame
from gateway_feishu.emulator import DEFAULT_APP, DEFAULT_SECRET, FeishuEmulator

Factory = Callable[..., Awaitable[FeishuEmulator]]

OTHER_APP, OTHER_SECRET = "cli_otherapp000002", "other-secret"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


@pytest.fixture
async def emu(feishu_emulator_factory: Factory) -> FeishuEmulator:
    return await feishu_emulator_factory(
        apps={DEFAULT_APP: DEFAULT_SECRET, OTHER_APP: OTHER_SECRET}
    )


class RawClient:
    """The bot side of a long connection, frame by frame."""

    def __init__(
        self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, url: str
    ) -> None:
        self.http = http
        self.ws = ws
        self.query = parse_qs(urlparse(url).query)
        self.service = int(self.query["service_id"][0])

    @classmethod
    async def connect(
        cls,
        http: aiohttp.ClientSession,
        emu: FeishuEmulator,
        app: str = DEFAULT_APP,
        secret: str = DEFAULT_SECRET,
    ) -> RawClient:
        answer = await endpoint(http, emu, app, secret)
        assert answer["code"] == 0, answer
        url = answer["data"]["URL"]
        return cls(http, await http.ws_connect(url), url)

    async def frame(self, timeout: float = 2.0) -> Frame:
        message = await self.ws.receive(timeout)
        assert message.type == aiohttp.WSMsgType.BINARY, message
        return Frame.from_bytes(message.data)

    async def event(self, timeout: float = 2.0) -> tuple[Frame, Any]:
        """The next DATA frame (parts reassembled) and its JSON payload."""
        first = await self.frame(timeout)
        parts = {int(first.header("seq") or 0): first.payload}
        while len(parts) < int(first.header("sum") or 1):
            part = await self.frame(timeout)
            assert part.header("message_id") == first.header("message_id")
            parts[int(part.header("seq") or 0)] = part.payload
        return first, json.loads(b"".join(parts[i] for i in sorted(parts)))

    async def ack(self, frame: Frame, code: int = 200, response: Any = None) -> None:
        await self.ws.send_bytes(frame.ack(code, biz_rt_ms=3, response=response).to_bytes())

    async def close(self) -> None:
        await self.ws.close()


async def endpoint(
    http: aiohttp.ClientSession, emu: FeishuEmulator, app: str, secret: str | None
) -> Any:
    async with http.post(
        emu.url + "/callback/ws/endpoint", json={"AppID": app, "AppSecret": secret}
    ) as resp:
        assert resp.status == 200
        return await resp.json()


async def token(
    http: aiohttp.ClientSession,
    emu: FeishuEmulator,
    app: str = DEFAULT_APP,
    secret: str = DEFAULT_SECRET,
) -> str:
    body = {"app_id": app, "app_secret": secret}
    async with http.post(
        emu.url + "/open-apis/auth/v3/tenant_access_token/internal", json=body
    ) as resp:
        answer = await resp.json()
    assert answer["code"] == 0, answer
    return str(answer["tenant_access_token"])


async def call(
    http: aiohttp.ClientSession,
    emu: FeishuEmulator,
    method: str,
    path: str,
    tok: str | None,
    body: Any = None,
    **params: str,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {tok}"} if tok else {}
    async with http.request(
        method, emu.url + path, json=body, headers=headers, params=params
    ) as resp:
        return resp.status, await resp.json()


def card_json(streaming: bool = True, **extra: Any) -> str:
    return json.dumps(
        {
            "schema": "2.0",
            "config": {"streaming_mode": streaming, "update_multi": True},
            "body": {"elements": [{"tag": "markdown", "element_id": "md", "content": ""}]},
            **extra,
        }
    )


# -- endpoint and handshake -----------------------------------------------------------------------


async def test_endpoint_answer_and_connection(
    emu: FeishuEmulator, http: aiohttp.ClientSession
) -> None:
    answer = await endpoint(http, emu, DEFAULT_APP, DEFAULT_SECRET)
    assert answer["code"] == 0
    assert set(answer["data"]["ClientConfig"]) == {
        "ReconnectCount",
        "ReconnectInterval",
        "ReconnectNonce",
        "PingInterval",
    }
    query = parse_qs(urlparse(answer["data"]["URL"]).query)
    assert query["device_id"] and query["service_id"]
    ws = await http.ws_connect(answer["data"]["URL"])
    (conn,) = await emu.wait_connected()
    assert conn.id == query["device_id"][0] and conn.app == DEFAULT_APP
    await ws.close()
    await emu.wait_until(lambda: not emu.live_connections)
    assert emu.connection_history[0].closed_by == "client"


@pytest.mark.parametrize("secret", ["wrong", None])
async def test_endpoint_auth_failed(
    emu: FeishuEmulator, http: aiohttp.ClientSession, secret: str | None
) -> None:
    answer = await endpoint(http, emu, DEFAULT_APP, secret)
    assert (answer["code"], answer["data"]) == (514, None)


async def test_refuse_connections(emu: FeishuEmulator, http: aiohttp.ClientSession) -> None:
    granted = await endpoint(http, emu, DEFAULT_APP, DEFAULT_SECRET)
    emu.refuse_connections = True
    assert (await endpoint(http, emu, DEFAULT_APP, DEFAULT_SECRET))["code"] == 1
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(granted["data"]["URL"])
    assert refused.value.headers is not None and refused.value.headers["handshake-status"] == "1"
    emu.refuse_connections = False
    assert (await endpoint(http, emu, DEFAULT_APP, DEFAULT_SECRET))["code"] == 0


async def test_ticket_single_use(emu: FeishuEmulator, http: aiohttp.ClientSession) -> None:
    url = (await endpoint(http, emu, DEFAULT_APP, DEFAULT_SECRET))["data"]["URL"]
    ws = await http.ws_connect(url)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(url)
    assert refused.value.headers is not None and refused.value.headers["handshake-status"] == "403"
    await ws.close()


async def test_connection_limit(
    feishu_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await feishu_emulator_factory(max_connections=2)
    urls = [
        (await endpoint(http, emu, DEFAULT_APP, DEFAULT_SECRET))["data"]["URL"] for _ in range(3)
    ]
    sockets = [await http.ws_connect(url) for url in urls[:2]]
    assert (await endpoint(http, emu, DEFAULT_APP, DEFAULT_SECRET))["code"] == 1000040350
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(urls[2])
    headers = refused.value.headers
    assert headers is not None
    assert (headers["handshake-status"], headers["handshake-autherrcode"]) == ("514", "1000040350")
    for ws in sockets:
        await ws.close()


# -- frames -----------------------------------------------------------------------------------------


async def test_ping_pong_carries_client_config(
    feishu_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await feishu_emulator_factory(ping_interval=7, reconnect_nonce=0)
    client = await RawClient.connect(http, emu)
    await client.ws.send_bytes(Frame.ping(client.service).to_bytes())
    pong = await client.frame()
    assert (pong.method, pong.type, pong.service) == (CONTROL, "pong", client.service)
    assert json.loads(pong.payload) == {
        "ReconnectCount": -1,
        "ReconnectInterval": 120,
        "ReconnectNonce": 0,
        "PingInterval": 7,
    }
    emu.stop_pongs = True
    await client.ws.send_bytes(Frame.ping(client.service).to_bytes())
    with pytest.raises(asyncio.TimeoutError):
        await client.frame(timeout=0.3)
    assert [p.answered for p in emu.pings] == [True, False]
    await client.close()


async def test_event_frame_and_ack(emu: FeishuEmulator, http: aiohttp.ClientSession) -> None:
    client = await RawClient.connect(http, emu)
    sent = await emu.send_message(text="hello", sender="bob")
    frame, payload = await client.event()
    assert frame.method == DATA and frame.service == client.service
    assert (frame.type, frame.header("sum"), frame.header("seq")) == ("event", "1", "0")
    assert frame.header("trace_id") and frame.header("message_id") == sent.frame_id
    assert payload["schema"] == "2.0" and payload["header"]["event_type"] == "im.message.receive_v1"
    assert payload["header"]["event_id"] == sent.event_id
    message = payload["event"]["message"]
    assert (message["chat_type"], json.loads(message["content"])) == ("p2p", {"text": "hello"})
    assert message["message_id"] == sent.message_id
    assert payload["event"]["sender"]["sender_id"]["open_id"] == emu.user("bob").open_id
    assert not emu.acked(sent.event_id)
    await client.ack(frame)
    ack = await emu.wait_acked(sent.event_id, 2)
    assert (ack.code, ack.biz_rt, ack.connection_id) == (200, "3", sent.connection_id)
    assert emu.deliveries(sent.event_id) == 1 and not emu.violations
    await client.close()


async def test_multi_part_payload(
    feishu_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await feishu_emulator_factory(split_payload=64)
    client = await RawClient.connect(http, emu)
    sent = await emu.send_message(text="long " * 100)
    frame, payload = await client.event()
    assert int(frame.header("sum") or 0) > 1
    assert payload == sent.payload
    await client.ack(frame)
    await emu.wait_acked(sent.event_id, 2)
    await client.close()


async def test_repush_until_acked(
    feishu_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await feishu_emulator_factory(ack_timeout=0.2)
    client = await RawClient.connect(http, emu)
    sent = await emu.send_message(text="again")
    first, payload = await client.event()
    second, again = await client.event(timeout=2)
    assert again == payload and second.header("message_id") != first.header("message_id")
    await client.ack(first, code=500)  # a failed handler: still not ACKed
    third, _ = await client.event(timeout=2)
    await client.ack(third)
    await emu.wait_acked(sent.event_id, 2)
    await asyncio.sleep(0.4)
    assert emu.deliveries(sent.event_id) == 3 and not emu.undeliverable
    await client.close()


async def test_repush_gives_up_after_cap(
    feishu_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await feishu_emulator_factory(ack_timeout=0.05, max_redeliveries=2)
    client = await RawClient.connect(http, emu)
    sent = await emu.send_message(text="never acked")
    await emu.wait_until(lambda: sent.event_id in emu.undeliverable, 2)
    assert emu.deliveries(sent.event_id) == 3
    await client.close()


async def test_repush_waits_for_a_reconnect(
    feishu_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await feishu_emulator_factory(ack_timeout=0.1)
    client = await RawClient.connect(http, emu)
    sent = await emu.send_message(text="lost")
    await client.event()
    assert await emu.drop_connections() == 1
    assert emu.connection_history[0].closed_by == "dropped"
    await asyncio.sleep(0.3)
    fresh = await RawClient.connect(http, emu)
    frame, payload = await fresh.event(timeout=2)
    assert payload["header"]["event_id"] == sent.event_id
    await fresh.ack(frame)
    assert (await emu.wait_acked(sent.event_id)).connection_id == fresh.query["device_id"][0]
    await fresh.close()


async def test_protocol_violations(emu: FeishuEmulator, http: aiohttp.ClientSession) -> None:
    client = await RawClient.connect(http, emu)
    sent = await emu.send_message()
    frame, _ = await client.event()
    await client.ack(frame)
    await client.ack(frame)
    await client.ws.send_bytes(
        Frame.build(DATA, {"message_id": "nope", "type": "event"}).to_bytes()
    )
    await client.ws.send_bytes(b"\xff\x00not protobuf")
    await client.ws.send_str("text frame")
    await emu.wait_until(lambda: len(emu.violations) >= 4, 2)
    kinds = [v.kind for v in emu.violations]
    assert kinds == ["duplicate_ack", "unknown_ack", "bad_frame", "text_frame"]
    assert emu.acked(sent.event_id)
    await client.close()


async def test_cluster_mode_one_connection_per_event(
    feishu_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await feishu_emulator_factory(seed=7)
    clients = [await RawClient.connect(http, emu) for _ in range(2)]
    sent = [await emu.send_message(text=f"m{i}") for i in range(12)]
    by_connection = {conn.id: 0 for conn in emu.live_connections}
    for delivery in sent:
        assert delivery.connection_id is not None
        by_connection[delivery.connection_id] += 1
    assert all(count > 0 for count in by_connection.values()) and sum(by_connection.values()) == 12
    for client in clients:
        for _ in range(by_connection[client.query["device_id"][0]]):
            frame, _ = await client.event()
            await client.ack(frame)
        await client.close()
    assert all(emu.acked(d.event_id) for d in sent)


async def test_group_messages_need_a_mention(
    emu: FeishuEmulator, http: aiohttp.ClientSession
) -> None:
    client = await RawClient.connect(http, emu)
    ignored = await emu.send_message(text="chatter", chat_type="group", mention_bot=False)
    assert not ignored.delivered and emu.deliveries(ignored.event_id) == 0
    sent = await emu.send_message(text="question", chat_type="group", mentions=["carol"])
    frame, payload = await client.event()
    message = payload["event"]["message"]
    assert message["chat_type"] == "group"
    assert json.loads(message["content"])["text"] == "@_user_1 @_user_2 question"
    bot, carol = message["mentions"]
    assert (bot["key"], bot["id"]["open_id"]) == ("@_user_1", emu.bot().open_id)
    assert (carol["key"], carol["name"]) == ("@_user_2", "carol")
    await client.ack(frame)
    await emu.wait_acked(sent.event_id)
    await client.close()


async def test_raw_and_hostile_payloads(emu: FeishuEmulator, http: aiohttp.ClientSession) -> None:
    client = await RawClient.connect(http, emu)
    sent = await emu.push_event(b"\x00not json", event_id="raw-1")
    frame = await client.frame()
    assert frame.payload == b"\x00not json" and sent.event_id == "raw-1"
    await client.ack(frame)
    await emu.wait_acked("raw-1")
    await client.close()


async def test_any_json_payload_and_refused_upgrade(
    emu: FeishuEmulator, http: aiohttp.ClientSession
) -> None:
    client = await RawClient.connect(http, emu)
    sent = await emu.push_event(["not", "an", "object"])
    frame, payload = await client.event()
    assert payload == ["not", "an", "object"] and frame.header("message_id") == sent.frame_id
    url = (await endpoint(http, emu, DEFAULT_APP, DEFAULT_SECRET))["data"]["URL"]
    emu.fail_next("/ws/v2", http_status=503, code=1000040343, msg="internal error")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(url)
    assert refused.value.status == 503
    assert refused.value.headers is not None
    assert refused.value.headers["handshake-status"] == "1000040343"
    await client.close()


async def test_server_close_and_restart_on_same_port(
    feishu_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await feishu_emulator_factory()
    client = await RawClient.connect(http, emu)
    await emu.wait_connected()
    assert await emu.server_close(code=1001, message="bye") == 1
    closed = await client.ws.receive(2)
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1001
    port = emu.port
    await emu.close()
    again = await feishu_emulator_factory(port=port)
    assert again.url == emu.url
    assert (await endpoint(http, again, DEFAULT_APP, DEFAULT_SECRET))["code"] == 0


# -- tenant token -------------------------------------------------------------------------------------


async def test_tenant_token(emu: FeishuEmulator, http: aiohttp.ClientSession) -> None:
    path = "/open-apis/auth/v3/tenant_access_token/internal"
    async with http.post(
        emu.url + path, json={"app_id": DEFAULT_APP, "app_secret": DEFAULT_SECRET}
    ) as resp:
        first = await resp.json()
    assert first["code"] == 0 and first["tenant_access_token"].startswith("t-")
    assert 7000 < first["expire"] <= 7200 and "data" not in first
    assert await token(http, emu) == first["tenant_access_token"]  # reused while > 30 min left
    async with http.post(emu.url + path, json={"app_id": DEFAULT_APP, "app_secret": "bad"}) as resp:
        assert (resp.status, (await resp.json())["code"]) == (400, 10014)
    status, body = await call(http, emu, "POST", "/open-apis/cardkit/v1/cards", None, {})
    assert (status, body["code"]) == (400, 99991661)
    emu.expire_tokens()
    status, body = await call(
        http, emu, "POST", "/open-apis/cardkit/v1/cards", first["tenant_access_token"], {}
    )
    assert (status, body["code"]) == (400, 99991663)
    assert await token(http, emu) != first["tenant_access_token"]
    assert emu.tokens_issued == 2


async def test_short_token_ttl_gives_new_tokens(
    feishu_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await feishu_emulator_factory(token_ttl=0.2)
    first = await token(http, emu)
    assert await token(http, emu) != first  # less than 30 min left: a fresh one
    await asyncio.sleep(0.3)
    status, body = await call(http, emu, "POST", "/open-apis/cardkit/v1/cards", first, {})
    assert (status, body["code"]) == (400, 99991663)


# -- IM messages --------------------------------------------------------------------------------------


async def test_create_reply_and_uuid(emu: FeishuEmulator, http: aiohttp.ClientSession) -> None:
    client = await RawClient.connect(http, emu)
    sent = await emu.send_message(text="hi", chat_type="group")
    tok = await token(http, emu)
    text = json.dumps({"text": "answer"})
    body = {"receive_id": sent.chat_id, "msg_type": "text", "content": text, "uuid": "u-1"}
    status, created = await call(
        http, emu, "POST", "/open-apis/im/v1/messages", tok, body, receive_id_type="chat_id"
    )
    assert status == 200 and created["code"] == 0
    data = created["data"]
    assert data["message_id"].startswith("om_") and data["chat_id"] == sent.chat_id
    assert data["sender"] == {
        "id": DEFAULT_APP,
        "id_type": "app_id",
        "sender_type": "app",
        "tenant_key": emu.tenant_key,
    }
    status, again = await call(
        http, emu, "POST", "/open-apis/im/v1/messages", tok, body, receive_id_type="chat_id"
    )
    assert again["data"]["message_id"] == data["message_id"] and len(emu.messages) == 1
    reply = {"msg_type": "text", "content": json.dumps({"text": "reply"}), "uuid": "u-2"}
    assert sent.message_id is not None
    status, replied = await call(
        http, emu, "POST", f"/open-apis/im/v1/messages/{sent.message_id}/reply", tok, reply
    )
    assert replied["data"]["parent_id"] == sent.message_id
    assert [m.text for m in emu.replies(sent.message_id)] == ["reply"]
    status, unknown = await call(
        http, emu, "POST", "/open-apis/im/v1/messages/om_nope/reply", tok, reply | {"uuid": "u-3"}
    )
    assert (status, unknown["code"]) == (400, 230011)
    status, bad = await call(
        http,
        emu,
        "POST",
        "/open-apis/im/v1/messages",
        tok,
        body | {"receive_id": "oc_unknown", "uuid": "u-4"},
        receive_id_type="chat_id",
    )
    assert (status, bad["code"]) == (400, 230002)
    await client.close()


async def test_send_to_user_and_limits(emu: FeishuEmulator, http: aiohttp.ClientSession) -> None:
    user = emu.user("dave")
    tok = await token(http, emu)
    path = "/open-apis/im/v1/messages"
    body = {"receive_id": user.open_id, "msg_type": "text", "content": json.dumps({"text": "x"})}
    results = [
        await call(http, emu, "POST", path, tok, body, receive_id_type="open_id") for _ in range(7)
    ]
    codes = [answer["code"] for _, answer in results]
    assert codes.count(0) == 5 and codes[5:] == [230020, 230020]
    assert sum(emu.rejections.values()) == 2 and {r.limit for r in emu.rejection_log} == {"chat"}
    long_text = {
        "receive_id": user.open_id,
        "msg_type": "text",
        "content": json.dumps({"text": "x" * 160_000}),
    }
    emu.chat_rate_limit = None
    status, too_long = await call(
        http, emu, "POST", path, tok, long_text, receive_id_type="open_id"
    )
    assert (status, too_long["code"]) == (400, 230025)
    status, bad_type = await call(http, emu, "POST", path, tok, body, receive_id_type="nope")
    assert (status, bad_type["code"]) == (400, 99992402)
    status, patched = await call(
        http, emu, "PATCH", f"{path}/{emu.messages[0].message_id}", tok, {"content": "{}"}
    )
    assert (status, patched["code"]) == (400, 230001)  # only cards can be PATCHed


# -- CardKit --------------------------------------------------------------------------------------------


async def create_card(
    http: aiohttp.ClientSession, emu: FeishuEmulator, tok: str, data: str | None = None
) -> str:
    status, answer = await call(
        http,
        emu,
        "POST",
        "/open-apis/cardkit/v1/cards",
        tok,
        {"type": "card_json", "data": data or card_json()},
    )
    assert (status, answer["code"]) == (200, 0), answer
    return str(answer["data"]["card_id"])


async def test_card_streaming_flow(emu: FeishuEmulator, http: aiohttp.ClientSession) -> None:
    client = await RawClient.connect(http, emu)
    sent = await emu.send_message(text="question")
    tok = await token(http, emu)
    card_id = await create_card(http, emu, tok)
    content = json.dumps({"type": "card", "data": {"card_id": card_id}})
    status, replied = await call(
        http,
        emu,
        "POST",
        f"/open-apis/im/v1/messages/{sent.message_id}/reply",
        tok,
        {"msg_type": "interactive", "content": content},
    )
    assert replied["code"] == 0
    card = emu.card_of(replied["data"]["message_id"])
    assert (
        card is not None
        and card.streaming_mode
        and card.message_ids == [replied["data"]["message_id"]]
    )
    element = f"/open-apis/cardkit/v1/cards/{card_id}/elements/md/content"
    for seq, text in enumerate(["Hel", "Hello", "Hello!"], start=1):
        status, answer = await call(
            http, emu, "PUT", element, tok, {"content": text, "sequence": seq, "uuid": f"c{seq}"}
        )
        assert (status, answer["code"]) == (200, 0)
    assert card.contents == {"md": "Hello!"} and card.content_updates == 3 and card.sequence == 3
    status, stale = await call(
        http, emu, "PUT", element, tok, {"content": "Hello!!", "sequence": 3}
    )
    assert (status, stale["code"]) == (400, 300317)
    settings = json.dumps({"config": {"streaming_mode": False}})
    status, answer = await call(
        http,
        emu,
        "PATCH",
        f"/open-apis/cardkit/v1/cards/{card_id}/settings",
        tok,
        {"settings": settings, "sequence": 4},
    )
    assert answer["code"] == 0 and card.finished
    status, closed = await call(http, emu, "PUT", element, tok, {"content": "late", "sequence": 5})
    assert (status, closed["code"]) == (400, 300309)
    assert [v.kind for v in emu.violations] == ["sequence_not_increasing", "update_after_close"]
    await client.close()


async def test_card_errors_and_idempotency(
    emu: FeishuEmulator, http: aiohttp.ClientSession
) -> None:
    tok, other = await token(http, emu), await token(http, emu, OTHER_APP, OTHER_SECRET)
    card_id = await create_card(http, emu, tok)
    element = f"/open-apis/cardkit/v1/cards/{card_id}/elements/md/content"
    status, answer = await call(http, emu, "PUT", element, other, {"content": "x", "sequence": 1})
    assert (status, answer["code"]) == (400, 300311)
    status, answer = await call(
        http,
        emu,
        "PUT",
        "/open-apis/cardkit/v1/cards/123/elements/md/content",
        tok,
        {"content": "x", "sequence": 1},
    )
    assert answer["code"] == 200740
    body = {"content": "once", "sequence": 1, "uuid": "same"}
    assert (await call(http, emu, "PUT", element, tok, body))[1]["code"] == 0
    assert (await call(http, emu, "PUT", element, tok, body))[1][
        "code"
    ] == 0  # replay: not applied again
    assert emu.cards[card_id].content_updates == 1
    status, answer = await call(
        http, emu, "PUT", element, tok, {"content": "twice", "sequence": 2, "uuid": "same"}
    )
    assert answer["code"] == 200770
    status, answer = await call(
        http,
        emu,
        "PATCH",
        f"/open-apis/cardkit/v1/cards/{card_id}/settings",
        tok,
        {"settings": '{"streaming_mode": false}', "sequence": 3},
    )
    assert (
        answer["code"] == 0 and emu.cards[card_id].streaming_mode
    )  # no config wrapper: nothing changes
    assert [v.kind for v in emu.violations] == ["settings_without_config"]
    status, answer = await call(
        http,
        emu,
        "POST",
        "/open-apis/cardkit/v1/cards",
        tok,
        {"type": "card_json", "data": json.dumps({"config": {"update_multi": False}})},
    )
    assert answer["code"] == 300302


async def test_card_full_update_shows_buttons(
    emu: FeishuEmulator, http: aiohttp.ClientSession
) -> None:
    tok = await token(http, emu)
    card_id = await create_card(http, emu, tok)
    final = card_json(streaming=False)
    data = json.loads(final)
    data["body"]["elements"].append(
        {"tag": "button", "text": {"tag": "plain_text", "content": "👍"}, "value": {"rating": "up"}}
    )
    body = {"card": {"type": "card_json", "data": json.dumps(data)}, "sequence": 1}
    _status, answer = await call(
        http, emu, "PUT", f"/open-apis/cardkit/v1/cards/{card_id}", tok, body
    )
    assert answer["code"] == 0
    card = emu.cards[card_id]
    assert card.finished and card.shows_buttons and card.buttons[0]["value"] == {"rating": "up"}


async def test_card_rate_limits(emu: FeishuEmulator, http: aiohttp.ClientSession) -> None:
    tok = await token(http, emu)
    card_id = await create_card(http, emu, tok)
    element = f"/open-apis/cardkit/v1/cards/{card_id}/elements/md/content"
    statuses = []
    for seq in range(1, 13):
        async with http.put(
            emu.url + element,
            json={"content": "x" * seq, "sequence": seq},
            headers={"Authorization": f"Bearer {tok}"},
        ) as resp:
            statuses.append(
                (
                    resp.status,
                    (await resp.json())["code"],
                    resp.headers.get("x-ogw-ratelimit-limit"),
                )
            )
    assert statuses[:10] == [(200, 0, None)] * 10
    # The per-card limit's answer is undocumented: like the app's, without the gateway's headers
    # (no "x-ogw-ratelimit-limit: 10" that a client would take for the app's limit).
    assert statuses[10:] == [(429, 99991400, None)] * 2
    assert {r.limit for r in emu.rejection_log} == {"card"} and sum(emu.rejections.values()) == 2


async def test_app_limit_answers_carry_the_gateway_headers(
    feishu_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await feishu_emulator_factory(app_rate_limit=2)
    tok = await token(http, emu)
    answers = []
    for _ in range(3):
        async with http.post(
            emu.url + "/open-apis/cardkit/v1/cards",
            json={"type": "card_json", "data": card_json()},
            headers={"Authorization": f"Bearer {tok}"},
        ) as resp:
            answers.append((resp.status, resp.headers.get("x-ogw-ratelimit-limit")))
    assert answers == [(200, None), (200, None), (429, "2")]
    emu.fail_next("/open-apis/im/", http_status=429)  # injected: the app's limit too
    status, answer = await call(http, emu, "POST", "/open-apis/im/v1/messages", tok, {})
    assert (status, answer["code"]) == (429, 99991400)
    assert emu.calls[-1].status == 429


async def test_app_minute_limit(
    feishu_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await feishu_emulator_factory(app_minute_limit=3)
    tok = await token(http, emu)
    for _ in range(3):
        await create_card(http, emu, tok)
    status, answer = await call(
        http,
        emu,
        "POST",
        "/open-apis/cardkit/v1/cards",
        tok,
        {"type": "card_json", "data": card_json()},
    )
    assert (status, answer["code"]) == (429, 99991400)
    assert [r.limit for r in emu.rejection_log] == ["app-minute"]
    # message sends are counted separately (per API)
    sent = emu.message("hi", chat_type="group")
    body = {
        "receive_id": sent["event"]["message"]["chat_id"],
        "msg_type": "text",
        "content": json.dumps({"text": "x"}),
    }
    status, answer = await call(
        http, emu, "POST", "/open-apis/im/v1/messages", tok, body, receive_id_type="chat_id"
    )
    assert answer["code"] == 0


async def test_streaming_timeout(
    feishu_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await feishu_emulator_factory(streaming_timeout=0.2)
    tok = await token(http, emu)
    card_id = await create_card(http, emu, tok)
    card = emu.cards[card_id]
    element = f"/open-apis/cardkit/v1/cards/{card_id}/elements/md/content"
    settings = f"/open-apis/cardkit/v1/cards/{card_id}/settings"

    async def content(text: str, sequence: int) -> int:
        body = {"content": text, "sequence": sequence}
        return int((await call(http, emu, "PUT", element, tok, body))[1]["code"])

    async def streaming(on: bool, sequence: int) -> int:
        body = {"settings": json.dumps({"config": {"streaming_mode": on}}), "sequence": sequence}
        return int((await call(http, emu, "PATCH", settings, tok, body))[1]["code"])

    assert await content("early", 1) == 0
    await asyncio.sleep(0.3)
    # The first call after the timeout hears about it, later ones that streaming is closed.
    assert await content("late", 2) == 200850
    assert not card.streaming_mode and not card.finished and card.timed_out_at is not None
    assert await content("later", 3) == 300309
    assert [v.kind for v in emu.violations] == ["update_after_close"]  # it was told
    # Turning streaming on again restarts the clock.
    assert await streaming(True, 4) == 0
    assert await content("again", 5) == 0 and card.contents["md"] == "again"
    # A timeout the client never streamed into does not finish the card; switching it off does.
    emu.expire_streaming(card_id)
    assert not card.streaming_mode and not card.finished
    assert await streaming(False, 6) == 0 and card.finished
    # A full update needs no streaming mode.
    card2 = emu.cards[await create_card(http, emu, tok)]
    emu.expire_streaming(card2.card_id)
    final = json.dumps(
        {
            "schema": "2.0",
            "config": {"streaming_mode": False},
            "body": {"elements": [{"tag": "markdown", "element_id": "md", "content": "done"}]},
        }
    )
    body = {"card": {"type": "card_json", "data": final}, "sequence": 1}
    path = f"/open-apis/cardkit/v1/cards/{card2.card_id}"
    assert (await call(http, emu, "PUT", path, tok, body))[1]["code"] == 0
    assert card2.finished and card2.contents == {"md": "done"}


async def test_a_card_entity_is_sent_only_once(
    feishu_emulator_factory: Factory, http: aiohttp.ClientSession
) -> None:
    emu = await feishu_emulator_factory(uuid_window=0.3)
    tok = await token(http, emu)
    chat = emu.add_chat("ops").id
    text = {"receive_id": chat, "msg_type": "text", "content": json.dumps({"text": "hi"})}
    status, parent = await call(
        http, emu, "POST", "/open-apis/im/v1/messages", tok, text, receive_id_type="chat_id"
    )
    assert status == 200, parent
    card_id = await create_card(http, emu, tok)
    content = json.dumps({"type": "card", "data": {"card_id": card_id}})
    reply = f"/open-apis/im/v1/messages/{parent['data']['message_id']}/reply"
    body = {"msg_type": "interactive", "content": content, "uuid": "send-once"}
    first = (await call(http, emu, "POST", reply, tok, body))[1]
    assert first["code"] == 0, first
    # The same uuid within its window is the same send: the first message comes back.
    again = (await call(http, emu, "POST", reply, tok, body))[1]
    assert again["data"]["message_id"] == first["data"]["message_id"]
    # Another send of that card, to the chat or as a reply (or the same uuid later), is refused.
    status, other = await call(
        http,
        emu,
        "POST",
        "/open-apis/im/v1/messages",
        tok,
        {"receive_id": chat, "msg_type": "interactive", "content": content},
        receive_id_type="chat_id",
    )
    assert (status, other["code"]) == (400, 230099)
    await asyncio.sleep(0.4)
    status, late = await call(http, emu, "POST", reply, tok, body)
    assert (status, late["code"]) == (400, 230099)
    assert emu.cards[card_id].message_ids == [first["data"]["message_id"]]


# -- card callbacks --------------------------------------------------------------------------------------


async def test_click_card_returns_the_ack_response(
    emu: FeishuEmulator, http: aiohttp.ClientSession
) -> None:
    client = await RawClient.connect(http, emu)
    tok = await token(http, emu)
    sent = await emu.send_message()
    frame, _ = await client.event()
    await client.ack(frame)
    card_id = await create_card(http, emu, tok)
    content = json.dumps({"type": "card", "data": {"card_id": card_id}})
    _status, replied = await call(
        http,
        emu,
        "POST",
        f"/open-apis/im/v1/messages/{sent.message_id}/reply",
        tok,
        {"msg_type": "interactive", "content": content},
    )
    clicked = asyncio.create_task(emu.click_card(card_id, "alice", {"rating": "up"}))
    frame, payload = await client.event()
    assert frame.type == "card" and payload["header"]["event_type"] == "card.action.trigger"
    event = payload["event"]
    assert event["action"] == {"value": {"rating": "up"}, "tag": "button"}
    assert event["context"] == {
        "open_message_id": replied["data"]["message_id"],
        "open_chat_id": sent.chat_id,
    }
    assert event["operator"]["open_id"] == emu.user("alice").open_id
    assert len(payload["header"]["create_time"]) == 16  # microseconds
    toast = {"toast": {"type": "success", "content": "thanks"}}
    await client.ack(frame, response=toast)
    assert await clicked == toast
    ack = emu.acks[-1]
    assert json.loads(ack.payload)["data"] == base64.b64encode(json.dumps(toast).encode()).decode()
    (click,) = emu.card_clicks
    assert (click.card_id, click.response) == (card_id, toast)
    assert (
        await emu.click_card(card_id, "alice", {"rating": "down"}, timeout=0.2) is None
    )  # nobody answers
    assert emu.deliveries(emu.card_clicks[-1].event_id) == 1  # callbacks are never re-pushed
    await client.close()


# -- injected faults -----------------------------------------------------------------------------------


async def test_fail_next_and_latency(emu: FeishuEmulator, http: aiohttp.ClientSession) -> None:
    tok = await token(http, emu)
    emu.fail_next("/open-apis/cardkit", count=2, http_status=429)
    for _ in range(2):
        status, answer = await call(
            http,
            emu,
            "POST",
            "/open-apis/cardkit/v1/cards",
            tok,
            {"type": "card_json", "data": card_json()},
        )
        assert (status, answer["code"]) == (429, 99991400)
    await create_card(http, emu, tok)
    emu.fail_next("/callback/ws/endpoint", http_status=200, code=1, msg="system busy")
    assert (await endpoint(http, emu, DEFAULT_APP, DEFAULT_SECRET))["code"] == 1
    emu.latency = 0.2
    started = asyncio.get_running_loop().time()
    await create_card(http, emu, tok)
    assert asyncio.get_running_loop().time() - started >= 0.2
    assert emu.count("/open-apis/cardkit/v1/cards", status=429) == 2
