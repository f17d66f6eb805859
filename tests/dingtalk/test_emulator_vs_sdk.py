"""Oracle: the official ``dingtalk-stream`` SDK (0.24.3) talks to the emulator as to DingTalk.

The SDK's own client runs in a subprocess: it reads ``DINGTALK_OPENAPI_ENDPOINT`` when it is
imported, cannot be stopped from inside (``start_forever`` swallows cancellation) and does blocking
I/O.  Its handlers reply through the ``sessionWebhook``, drive an AI card with the SDK's own card
helpers (two-step create+deliver, PUT, streaming) and answer card clicks; the test checks that every
frame was acked as the protocol says, every OpenAPI call was accepted, and that the SDK reconnects
after ``SYSTEM/disconnect``.  Loopback only; the subprocess is killed in any case.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway_dingtalk.emulator import (
    BOT_TOPIC,
    CARD_TOPIC,
    DEFAULT_APP,
    DEFAULT_SECRET,
    DingTalkEmulator,
)

pytest.importorskip("dingtalk_stream")

Factory = Callable[..., Awaitable[DingTalkEmulator]]

CARD_TEMPLATE = "sdk-oracle.schema"
SDK_AI_TEMPLATE = "382e4302-551d-4880-bf29-a30acfab2e71.schema"  # AIMarkdownCardInstance's

SDK_CLIENT = textwrap.dedent(
    """
    import sys

    import dingtalk_stream  # reads DINGTALK_OPENAPI_ENDPOINT now
    from dingtalk_stream import (
        AckMessage, AICardReplier, AIMarkdownCardInstance, CallbackHandler, CardCallbackMessage,
        Card_Callback_Router_Topic, ChatbotHandler, ChatbotMessage, Credential, DingTalkStreamClient,
    )

    APP, SECRET, TEMPLATE = sys.argv[1:4]


    class Bot(ChatbotHandler):
        async def process(self, callback):
            incoming = ChatbotMessage.from_dict(callback.data)
            text = incoming.text.content.strip()
            if text == "card":
                replier = AICardReplier(self.dingtalk_client, incoming)
                card_id = replier.create_and_deliver_card(TEMPLATE, {"content": "", "flowStatus": "1"})
                replier.streaming(card_id, "content", "streamed by the SDK", append=False,
                                  finished=True, failed=False)
                self.reply_text("card:" + card_id, incoming)
            elif text == "ai":
                card = AIMarkdownCardInstance(self.dingtalk_client, incoming)
                card.ai_start()
                card.ai_streaming("Hel")
                card.ai_streaming("lo", append=True)
                card.ai_finish("Hello!")
                self.reply_markdown("AI", "ai:" + card.card_instance_id, incoming)
            else:
                self.reply_text("echo:" + text, incoming)
            return AckMessage.STATUS_OK, "OK"


    class CardClicks(CallbackHandler):
        async def process(self, callback):
            message = CardCallbackMessage.from_dict(callback.data)
            params = message.content["cardPrivateData"]["params"]
            return AckMessage.STATUS_OK, {
                "cardData": {"cardParamMap": {"choice": params["action"]}},
                "cardUpdateOptions": {"updateCardDataByKey": True},
            }


    client = DingTalkStreamClient(Credential(APP, SECRET))
    client.register_callback_handler(ChatbotMessage.TOPIC, Bot())
    client.register_callback_handler(Card_Callback_Router_Topic, CardClicks())
    client.start_forever()
    """
)


def _child_env(endpoint: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in ("http_proxy", "https_proxy", "all_proxy", "ws_proxy", "wss_proxy")
    }
    env.update(
        DINGTALK_OPENAPI_ENDPOINT=endpoint,
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONUNBUFFERED="1",
    )
    return env


async def test_official_sdk_against_the_emulator(
    dingtalk_emulator_factory: Factory, tmp_path: Path
) -> None:
    emu = await dingtalk_emulator_factory(
        templates={
            CARD_TEMPLATE: {"content", "flowStatus", "choice"},
            SDK_AI_TEMPLATE: {
                "msgTitle",
                "msgContent",
                "staticMsgContent",
                "flowStatus",
                "logo",
                "sys_full_json_obj",
            },
        },
        ack_timeout=10.0,
    )
    script = tmp_path / "sdk_client.py"
    script.write_text(SDK_CLIENT)
    log_path = tmp_path / "sdk_client.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            DEFAULT_APP,
            DEFAULT_SECRET,
            CARD_TEMPLATE,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=_child_env(emu.url),
        )
    try:
        async with asyncio.timeout(30):
            await _exercise(emu)
    except BaseException:
        print(log_path.read_text(errors="replace")[-6000:])  # shown by pytest on failure
        raise
    finally:
        if process.returncode is None:
            process.kill()
        await asyncio.wait_for(process.wait(), 10)


async def _exercise(emu: DingTalkEmulator) -> None:
    # -- connections/open as the SDK sends it ----------------------------------------------------------
    [conn] = await emu.wait_connected(timeout=20)
    assert {s.topic for s in conn.subscriptions} == {BOT_TOPIC, CARD_TOPIC}
    assert conn.ua == "dingtalk-sdk-python/v0.24.3-union"

    # -- a robot message: acked with code 200, replied through the session webhook -----------------------
    sent = await emu.send_message(text="hello", sender_staff_id="user1")
    ack = await emu.wait_acked(sent.msg_id, timeout=10)
    assert (ack.code, ack.connection_id, ack.data) == (200, conn.id, {"response": "OK"})
    [reply] = emu.replies(sent.msg_id)  # the SDK replies before it acks
    assert (reply.msgtype, reply.text, reply.at) == ("text", "echo:hello", {"atUserIds": ["user1"]})

    # -- the SDK's card helpers: createAndDeliver + streaming ------------------------------------------
    sent = await emu.send_message(text="card", sender_staff_id="user1")
    await emu.wait_acked(sent.msg_id, timeout=10)
    [reply] = emu.replies(sent.msg_id)
    card = emu.cards[reply.text.removeprefix("card:")]
    assert (card.template_id, card.callback_type, card.space) == (
        CARD_TEMPLATE,
        "STREAM",
        "dtv1.card//IM_ROBOT.user1",
    )
    assert (card.status, card.content["content"]) == ("finished", "streamed by the SDK")

    # -- AIMarkdownCardInstance: POST instances + deliver, PUT instances, streaming -------------------
    sent = await emu.send_message(text="ai", sender_staff_id="user1")
    await emu.wait_acked(sent.msg_id, timeout=10)
    [reply] = emu.replies(sent.msg_id)
    assert reply.msgtype == "markdown" and reply.title == "AI"
    ai_card = emu.cards[reply.text.removeprefix("ai:")]
    assert ai_card.template_id == SDK_AI_TEMPLATE
    assert (ai_card.flow_status, ai_card.param_map["msgContent"]) == ("3", "Hello!")
    assert [u.source for u in ai_card.history] == [
        "create",
        "deliver",
        "update",
        "streaming",
        "streaming",
        "update",
    ]
    assert emu.count("/v1.0/", status=200) == emu.count("/v1.0/")  # every SDK call was accepted

    # -- a card click: the ack's response updates the card ----------------------------------------------
    response = await emu.click_card(None, card.out_track_id, "user1", {"action": "up"}, ["like"])
    assert response == {
        "cardData": {"cardParamMap": {"choice": "up"}},
        "cardUpdateOptions": {"updateCardDataByKey": True},
    }
    assert card.param_map["choice"] == "up" and card.param_map["content"] == "streamed by the SDK"
    assert emu.card_clicks[-1].within_limit

    # -- SYSTEM ping: the opaque is echoed ----------------------------------------------------------
    [ping] = await emu.send_ping()
    ping_ack = await emu.wait_acked(ping.frame_id, timeout=5)
    assert (ping_ack.code, ping_ack.data) == (200, {"opaque": ping.opaque})
    assert emu.pings[-1].ok

    # -- SYSTEM disconnect: the SDK acks, closes and opens a new connection ------------------------------
    await emu.send_disconnect(close_after=5)
    await emu.wait_connection_opens(2, timeout=10)
    [new] = await emu.wait_connected(timeout=10)
    assert new.id != conn.id
    old = next(c for c in emu.connection_history if c.id == conn.id)
    assert (old.closed_by, old.close_code) == ("client", 1000)
    assert any(a.topic == "disconnect" and a.connection_id == conn.id for a in emu.acks)

    # -- and it still works on the new connection ---------------------------------------------------
    sent = await emu.send_message(text="again")
    assert (await emu.wait_acked(sent.msg_id, timeout=10)).connection_id == new.id
    assert not emu.violations, emu.violations
