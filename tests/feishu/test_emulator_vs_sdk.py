"""Oracle: the official ``lark-oapi`` SDK (1.7.5) talks to the emulator as to Feishu.

* Its long-connection client (``lark.ws.Client``) runs in a subprocess: it captures an event loop
  when imported, blocks in ``start()`` and cannot be stopped.  It must get its websocket URL from
  the endpoint, take the ClientConfig the emulator hands out (pings every second, reconnect at
  once), receive ``im.message.receive_v1`` events (also in several parts, also re-pushed), ACK
  them, and reconnect after the connection drops.
* Its REST client (``lark.Client``, sync, run in a worker thread) fetches the tenant token and
  drives messages and the CardKit streaming flow; the SDK must parse every answer.
* Its event dispatcher parses the ``card.action.trigger`` callback the emulator pushes and its
  response is ACKed the way ``ws/client.py`` encodes it.

Loopback only (``NO_PROXY`` set: the SDK uses ``requests``); the subprocess is killed in any case.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import attrs
import pytest

from gateway_feishu._frames import Frame
from gateway_feishu.emulator import DEFAULT_APP, DEFAULT_SECRET, FeishuEmulator

pytest.importorskip("lark_oapi")

Factory = Callable[..., Awaitable[FeishuEmulator]]

LOOPBACK = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}

WS_CLIENT = textwrap.dedent(
    """
    import json, sys, time
    import lark_oapi as lark

    def on_message(data):
        text = json.loads(data.event.message.content)["text"]
        print("EVENT", data.header.event_id, text[:20], flush=True)
        if text == "slow":
            time.sleep(0.8)  # the SDK ACKs only after the handler returns

    handler = lark.EventDispatcherHandler.builder("", "").register_p2_im_message_receive_v1(
        on_message
    ).build()
    lark.ws.Client(sys.argv[1], sys.argv[2], event_handler=handler, domain=sys.argv[3]).start()
    """
)


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in LOOPBACK.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
async def sdk_ws(
    feishu_emulator_factory: Factory,
) -> AsyncIterator[tuple[FeishuEmulator, asyncio.subprocess.Process]]:
    emu = await feishu_emulator_factory(
        ping_interval=1, reconnect_nonce=0, reconnect_interval=1, ack_timeout=0.5, split_payload=256
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WS_CLIENT,
        DEFAULT_APP,
        DEFAULT_SECRET,
        emu.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **LOOPBACK},
    )
    try:
        yield emu, proc
    finally:
        proc.kill()
        await proc.wait()


async def create_card(emu: FeishuEmulator) -> str:
    """A CardKit card of the default app, created over HTTP as a bot would."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        credentials = {"app_id": DEFAULT_APP, "app_secret": DEFAULT_SECRET}
        async with http.post(
            emu.url + "/open-apis/auth/v3/tenant_access_token/internal", json=credentials
        ) as resp:
            auth = {"Authorization": "Bearer " + (await resp.json())["tenant_access_token"]}
        body = {
            "type": "card_json",
            "data": json.dumps({"schema": "2.0", "body": {"elements": []}}),
        }
        async with http.post(
            emu.url + "/open-apis/cardkit/v1/cards", json=body, headers=auth
        ) as resp:
            return str((await resp.json())["data"]["card_id"])


async def read_events(
    proc: asyncio.subprocess.Process, count: int, timeout: float = 5.0
) -> list[list[str]]:
    """The next ``count`` ``EVENT`` lines the SDK's handler printed (log lines skipped)."""
    assert proc.stdout is not None
    events: list[list[str]] = []
    async with asyncio.timeout(timeout):
        while len(events) < count:
            line = (await proc.stdout.readline()).decode()
            assert line, "the SDK client exited"
            if line.startswith("EVENT "):
                events.append(line.rstrip("\n").split(maxsplit=2)[1:])
    return events


async def test_sdk_long_connection(
    sdk_ws: tuple[FeishuEmulator, asyncio.subprocess.Process],
) -> None:
    emu, proc = sdk_ws
    (conn,) = await emu.wait_connected(timeout=10)
    sent = await emu.send_message(text="hello from feishu")
    assert await read_events(proc, 1) == [[sent.event_id, "hello from feishu"]]
    ack = await emu.wait_acked(sent.event_id, 3)
    assert ack.code == 200 and ack.biz_rt is not None and ack.connection_id == conn.id
    # several parts (split_payload=256), reassembled by the SDK
    long = await emu.send_message(text="long " * 200)
    assert (await read_events(proc, 1))[0][0] == long.event_id
    await emu.wait_acked(long.event_id, 3)
    # a slow handler ACKs after ack_timeout: Feishu re-pushes the same event id
    slow = await emu.send_message(text="slow")
    assert [e[0] for e in await read_events(proc, 2)] == [slow.event_id, slow.event_id]
    await emu.wait_acked(slow.event_id, 3)
    # PingInterval=1 from the endpoint's ClientConfig: pings every second, each answered
    await emu.wait_until(lambda: len(emu.pings) >= 2, 3)
    assert all(p.answered for p in emu.pings)
    assert not emu.violations


async def test_sdk_reconnects_and_drops_card_frames(
    sdk_ws: tuple[FeishuEmulator, asyncio.subprocess.Process],
) -> None:
    emu, proc = sdk_ws
    await emu.wait_connected(timeout=10)
    assert await emu.drop_connections() == 1
    # ReconnectNonce=0: the SDK reconnects at once, asking the endpoint for a new URL
    await emu.wait_connected(timeout=5)
    assert emu.endpoint_grants == 2 and len(emu.connection_history) == 2
    sent = await emu.send_message(text="after reconnect")
    assert (await read_events(proc, 1))[0][0] == sent.event_id
    await emu.wait_acked(sent.event_id, 3)
    # lark-oapi 1.7.5 drops type=card frames without an ACK (oapi-sdk-python#126): a click
    # times out, which is why the driver owns its ws loop
    card_id = await create_card(emu)
    assert await emu.click_card(card_id, "alice", {"rating": "up"}, timeout=0.5) is None
    assert emu.card_clicks[-1].acked_at is None and not emu.violations


def test_frames_match_the_sdk_schema() -> None:
    """``gateway_feishu._frames`` and lark-oapi's generated ``pbbp2_pb2`` read each other's bytes."""
    from lark_oapi.ws.pb.pbbp2_pb2 import Frame as SdkFrame

    ours = attrs.evolve(
        Frame.build(
            1,
            [("type", "event"), ("message_id", "m1"), ("sum", "2"), ("seq", "1")],
            b"\x00{}",
            service=9,
        ),
        seq_id=5,
        log_id=2**63 + 1,
        log_id_new="new",
        payload_encoding="raw",
        payload_type="json",
    )
    theirs = SdkFrame()
    theirs.ParseFromString(ours.to_bytes())
    assert (theirs.SeqID, theirs.LogID, theirs.service, theirs.method) == (5, 2**63 + 1, 9, 1)
    assert [(h.key, h.value) for h in theirs.headers] == list(ours.headers)
    assert (theirs.payload, theirs.LogIDNew, theirs.payload_encoding) == (b"\x00{}", "new", "raw")
    ping = SdkFrame()
    ping.ParseFromString(Frame.ping(9).to_bytes())
    assert not ping.HasField("payload")  # as lark-oapi's own ping
    assert Frame.from_bytes(theirs.SerializeToString()) == ours
    header = theirs.headers.add()
    header.key, header.value = "biz_rt", "12"
    assert Frame.from_bytes(theirs.SerializeToString()).header("biz_rt") == "12"


async def test_sdk_rest_client(feishu_emulator: FeishuEmulator) -> None:
    import lark_oapi as lark
    from lark_oapi.api.cardkit.v1 import (
        ContentCardElementRequest,
        ContentCardElementRequestBody,
        CreateCardRequest,
        CreateCardRequestBody,
        SettingsCardRequest,
        SettingsCardRequestBody,
    )
    from lark_oapi.api.im.v1 import (
        CreateMessageRequest,
        CreateMessageRequestBody,
        ReplyMessageRequest,
        ReplyMessageRequestBody,
    )

    emu = feishu_emulator
    client = (
        lark.Client.builder().app_id(DEFAULT_APP).app_secret(DEFAULT_SECRET).domain(emu.url).build()
    )
    incoming = emu.message("question", chat_type="group")  # makes the group and user known
    chat_id = incoming["event"]["message"]["chat_id"]

    def run(call: Callable[..., Any], request: Any) -> Awaitable[Any]:
        return asyncio.to_thread(call, request)

    created = await run(
        client.im.v1.message.create,
        CreateMessageRequest.builder()
        .receive_id_type("chat_id")
        .request_body(
            CreateMessageRequestBody.builder()
            .receive_id(chat_id)
            .msg_type("text")
            .content(json.dumps({"text": "hi"}))
            .uuid("sdk-1")
            .build()
        )
        .build(),
    )
    assert created.success(), (created.code, created.msg)
    assert created.data.message_id == emu.messages[0].message_id and created.data.chat_id == chat_id
    assert created.data.sender.id_type == "app_id"
    assert emu.tokens_issued == 1 and emu.calls[-1].app == DEFAULT_APP

    card = await run(
        client.cardkit.v1.card.create,
        CreateCardRequest.builder()
        .request_body(
            CreateCardRequestBody.builder()
            .type("card_json")
            .data(
                json.dumps(
                    {
                        "schema": "2.0",
                        "config": {"streaming_mode": True},
                        "body": {
                            "elements": [{"tag": "markdown", "element_id": "md", "content": ""}]
                        },
                    }
                )
            )
            .build()
        )
        .build(),
    )
    assert card.success(), (card.code, card.msg)
    card_id = card.data.card_id
    replied = await run(
        client.im.v1.message.reply,
        ReplyMessageRequest.builder()
        .message_id(created.data.message_id)
        .request_body(
            ReplyMessageRequestBody.builder()
            .msg_type("interactive")
            .content(json.dumps({"type": "card", "data": {"card_id": card_id}}))
            .build()
        )
        .build(),
    )
    assert replied.success(), (replied.code, replied.msg)
    assert replied.data.parent_id == created.data.message_id

    def content(text: str, sequence: int) -> Awaitable[Any]:
        return run(
            client.cardkit.v1.card_element.content,
            ContentCardElementRequest.builder()
            .card_id(card_id)
            .element_id("md")
            .request_body(
                ContentCardElementRequestBody.builder().content(text).sequence(sequence).build()
            )
            .build(),
        )

    assert (await content("Hel", 1)).success()
    assert (await content("Hello", 2)).success()
    stale = await content("Hello?", 2)
    assert (stale.success(), stale.code) == (False, 300317)
    settings = await run(
        client.cardkit.v1.card.settings,
        SettingsCardRequest.builder()
        .card_id(card_id)
        .request_body(
            SettingsCardRequestBody.builder()
            .settings(json.dumps({"config": {"streaming_mode": False}}))
            .sequence(3)
            .build()
        )
        .build(),
    )
    assert settings.success(), (settings.code, settings.msg)
    state = emu.cards[card_id]
    assert state.finished and state.contents == {"md": "Hello"}
    assert emu.card_of(replied.data.message_id) is state
    closed = await content("late", 4)
    assert closed.code == 300309

    # A card entity is sent once: a second send (no uuid) is refused, and the SDK reads why.
    again = await run(
        client.im.v1.message.reply,
        ReplyMessageRequest.builder()
        .message_id(created.data.message_id)
        .request_body(
            ReplyMessageRequestBody.builder()
            .msg_type("interactive")
            .content(json.dumps({"type": "card", "data": {"card_id": card_id}}))
            .build()
        )
        .build(),
    )
    assert (again.success(), again.code) == (False, 230099)

    # Feishu's streaming timeout: 200850 once, then 300309, until streaming is switched on again.
    def streaming(on: bool, sequence: int) -> Awaitable[Any]:
        return run(
            client.cardkit.v1.card.settings,
            SettingsCardRequest.builder()
            .card_id(card_id)
            .request_body(
                SettingsCardRequestBody.builder()
                .settings(json.dumps({"config": {"streaming_mode": on}}))
                .sequence(sequence)
                .build()
            )
            .build(),
        )

    assert (await streaming(True, 5)).success()
    emu.expire_streaming(card_id)
    assert [(await content("x", 6)).code, (await content("xy", 7)).code] == [200850, 300309]
    assert (await streaming(True, 8)).success()
    assert (await content("xyz", 9)).success() and state.contents == {"md": "xyz"}


async def test_sdk_parses_card_callbacks(feishu_emulator: FeishuEmulator) -> None:
    import lark_oapi as lark
    from lark_oapi.core.json import JSON
    from lark_oapi.event.callback.model.p2_card_action_trigger import (
        P2CardActionTrigger,
        P2CardActionTriggerResponse,
    )

    emu = feishu_emulator
    seen: list[P2CardActionTrigger] = []

    def on_click(data: P2CardActionTrigger) -> P2CardActionTriggerResponse:
        seen.append(data)
        return P2CardActionTriggerResponse({"toast": {"type": "success", "content": "thanks"}})

    handler = (
        lark.EventDispatcherHandler.builder("", "")
        .register_p2_card_action_trigger(on_click)
        .build()
    )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        async with http.post(
            emu.url + "/callback/ws/endpoint",
            json={"AppID": DEFAULT_APP, "AppSecret": DEFAULT_SECRET},
        ) as resp:
            url = (await resp.json())["data"]["URL"]
        async with http.ws_connect(url) as ws:
            card_id = await create_card(emu)
            click = asyncio.create_task(emu.click_card(card_id, "bob", {"rating": "up"}))
            frame = Frame.from_bytes((await ws.receive(2)).data)
            assert frame.type == "card"
            result = handler._do_without_validation(frame.payload)  # what ws/client.py calls
            # exactly what lark-oapi's ws client writes back (ws/client.py, _handle_data_frame)
            data = base64.b64encode(JSON.marshal(result).encode()).decode()
            ack = attrs.evolve(
                frame.with_header("biz_rt", "1"),
                payload=json.dumps({"code": 200, "data": data}).encode(),
            )
            await ws.send_bytes(ack.to_bytes())
            assert await click == {"toast": {"type": "success", "content": "thanks"}}
    (event,) = seen
    assert event.header.event_type == "card.action.trigger"
    assert event.event.action.value == {"rating": "up"} and event.event.action.tag == "button"
    assert event.event.operator.open_id == emu.user("bob").open_id
