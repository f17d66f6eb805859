"""The ``feishu`` driver end to end: the real core, the driver found through its entry point, and
the Feishu emulator (real websocket with pbbp2 frames and real HTTP on 127.0.0.1).

Every test judges by what Feishu would show or record (``emu.cards``, ``emu.messages``,
``emu.acks``, ``emu.calls``, ``emu.violations``) and by what the core stored (inbox, feedback);
every wait has a deadline.  Each test uses its own app id, so the process-wide rate-limit bucket of
one test never slows another.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_instance
from gateway.errors import ConfigError, SendRejected
from gateway.logs import redact
from gateway.models import Incoming, Outgoing
from gateway.plugins import PluginRegistry
from gateway.runtime import Gateway
from gateway.store.inbox import InboxEntry
from gateway.supervisor import InstanceState
from gateway_feishu._cardstore import CardRecord, CardStore
from gateway_feishu._replies import send_uuid
from gateway_feishu.emulator import CardState, Delivery, FeishuEmulator, SentMessage
from gateway_testkit.feishu import ERROR_MARK, feishu_settings, message_text
from gateway_testkit.inprocess import (
    Start,
    instance_starter,
    running_gateway,
    slow_store,
    wait_connected,
)
from gateway_testkit.process import free_port

# The SOCKS5 proxy (pproxy) helpers of the DingTalk tests; they belong in the testkit.
from gateway_testkit.proxy import start_proxy, stop_proxy, wait_port

REGISTRY = PluginRegistry.discover()
SECRET = "fs-secret-3c9e27d1a8"
THINKING = "thinking about it…"
VALUES = ["very_helpful", "helpful", "not_helpful", "unhelpful"]  # the driver's default ratings
CARDS = "/open-apis/cardkit/v1/cards"
REPLY = "/open-apis/im/v1/messages/"

Factory = Callable[..., Awaitable[FeishuEmulator]]


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def app() -> str:
    """A fresh app id per test (the driver's token bucket is process-wide, keyed by it)."""
    return f"cli_{uuid.uuid4().hex[:16]}"


@pytest.fixture
async def emu(app: str, feishu_emulator_factory: Factory) -> FeishuEmulator:
    return await feishu_emulator_factory(apps={app: SECRET}, ack_timeout=3.0, seed=7)


@pytest.fixture
async def gateway(tmp_path: Path, emu: FeishuEmulator) -> AsyncIterator[Gateway]:
    # Depends on ``emu``: the gateway is closed first, while the emulator still answers.
    async with running_gateway(tmp_path / "state") as gw:
        yield gw


@pytest.fixture
def start(gateway: Gateway, emu: FeishuEmulator, app: str, tmp_path: Path) -> Start:
    settings = {**feishu_settings(emu, app_id=app, app_secret=SECRET), "thinking_text": THINKING}
    return instance_starter(gateway, tmp_path, "feishu", settings, REGISTRY)


# -- helpers -------------------------------------------------------------------------------------


async def ask(emu: FeishuEmulator, text: str = "hi", **options: Any) -> Delivery:
    """A user sends ``text``; wait for the driver's ACK."""
    sent = await emu.send_message(text, **options)
    assert sent.delivered
    await emu.wait_acked(sent.event_id, timeout=5)
    return sent


def card_of(emu: FeishuEmulator, sent: Delivery, part: int = 0) -> CardState | None:
    """The card answering ``sent`` (part ``part`` of a long answer)."""
    assert sent.message_id is not None
    cards = [m.card_id for m in emu.replies(sent.message_id) if m.card_id is not None]
    return emu.cards[cards[part]] if len(cards) > part else None


async def final_card(emu: FeishuEmulator, sent: Delivery, timeout: float = 10) -> CardState:
    """The first card of ``sent`` once streaming was switched off."""

    def done() -> bool:
        card = card_of(emu, sent)
        return card is not None and card.finished

    await emu.wait_until(done, timeout)
    card = card_of(emu, sent)
    assert card is not None
    return card


async def replies(emu: FeishuEmulator, sent: Delivery, count: int = 1) -> list[SentMessage]:
    assert sent.message_id is not None
    message_id = sent.message_id
    await emu.wait_until(lambda: len(emu.replies(message_id)) >= count, 10)
    return emu.replies(message_id)


async def settled(gateway: Gateway, sent: Delivery, timeout: float = 10) -> InboxEntry:
    """The inbox entry once the core recorded the outcome (after the reply ended)."""
    async with asyncio.timeout(timeout):
        while True:
            entry = await gateway.inbox.entry("bot", sent.message_id or "")
            if entry is not None and entry.outcome is not None:
                return entry
            await asyncio.sleep(0.01)


def sequences(card: CardState) -> list[int]:
    return [u.sequence for u in card.history if u.sequence is not None]


def answer(card: CardState) -> str:
    return card.contents.get("answer", "")


def reply_id_for(message_id: str) -> str:
    return Incoming.create(
        instance="bot", message_id=message_id, conversation_id="-", sender_id="-", text=""
    ).reply_id


# -- 1. the streaming card -------------------------------------------------------------------------


async def test_a_message_is_acked_at_once_and_answered_in_a_streaming_card_with_buttons(
    start: Start, emu: FeishuEmulator, gateway: Gateway
) -> None:
    async with asyncio.timeout(20):
        await start(agent={"type": "echo", "delay": 0.15})
        text = "one two three four five six seven eight"
        sent = await emu.send_message(text, sender="alice")
        ack = await emu.wait_acked(sent.event_id, timeout=2)
        # ACKed long before the agent (1.2 s) is done: Feishu re-pushes after 3 s otherwise.
        assert ack.ok and ack.latency < 0.5
        assert ack.biz_rt is not None and int(ack.biz_rt) < 500

        await emu.wait_until(lambda: card_of(emu, sent) is not None, 1.0)
        card = card_of(emu, sent)
        assert card is not None and not card.finished
        assert card.history[0].kind == "create"
        [message] = emu.replies(sent.message_id or "")
        assert message.msg_type == "interactive" and message.card_id == card.card_id
        assert json.loads(message.content) == {"type": "card", "data": {"card_id": card.card_id}}
        assert message.uuid  # a resumed reply is not sent twice

        card = await final_card(emu, sent)
        await emu.wait_until(lambda: card.shows_buttons, 3)
        assert answer(card) == text
        partial = [u.content for u in card.history if u.kind == "content"][:-1]
        assert len(partial) >= 2 and all(text.startswith(p or "") for p in partial)
        # After the "thinking" text, every update extends the one before (the typewriter effect).
        assert all([u.appended for u in card.history if u.kind == "content"][1:])
        assert sequences(card) == sorted(set(sequences(card)))  # strictly increasing
        assert [u.kind for u in card.history][-2:] == ["settings", "update"]
        values = [b["behaviors"][0]["value"] for b in card.buttons]
        reply_id = reply_id_for(sent.message_id or "")
        assert values == [{"reply_id": reply_id, "rating": v} for v in VALUES]
        assert card.data["config"]["summary"]["content"] == text
        entry = await settled(gateway, sent)
        assert (entry.message.text, entry.message.conversation_kind) == (text, "single")
        assert entry.message.sender_id == emu.user("alice").open_id
        assert len(emu.replies(sent.message_id or "")) == 1
        assert emu.violations == []
        assert emu.rejection_log == []  # paced within CardKit's 10 operations a second per card


async def test_group_messages_are_answered_only_when_they_mention_the_bot(
    start: Start, emu: FeishuEmulator, gateway: Gateway
) -> None:
    async with asyncio.timeout(15):
        await start()
        # Feishu's text: "@_user_1 @_user_2 what about it" (the bot, then carol).
        sent = await ask(emu, "what about it", chat_type="group", mentions=["carol"])
        card = await final_card(emu, sent)
        # The bot's own mention is gone; another person's reads as a name.
        assert answer(card) == "@carol what about it"
        entry = await settled(gateway, sent)
        # Only carol is a mention: the bot's own only addressed the message.
        assert [m.user_id for m in entry.message.mentions] == [emu.user("carol").open_id]
        assert entry.message.conversation_kind == "group"
        assert entry.message.conversation_id == sent.chat_id

        # An app with the "all group messages" scope also gets messages for others: ACKed, unanswered.
        payload = emu.message("not for the bot", chat_type="group", mention_bot=False)
        other = await emu.push_event(payload)
        assert (await emu.wait_acked(other.event_id, timeout=2)).ok
        await asyncio.sleep(0.3)
        assert emu.replies(other.message_id or "") == []
        assert await gateway.inbox.entry("bot", other.message_id or "") is None


async def test_rich_text_and_files_reach_the_agent_and_other_types_get_the_prompt(
    start: Start, emu: FeishuEmulator, gateway: Gateway
) -> None:
    async with asyncio.timeout(15):
        await start(agent={"type": "echo", "delay": 0, "prefix": "Q: "})
        post = {
            "title": "",
            "content": [[{"tag": "text", "text": "rich "}, {"tag": "text", "text": "words"}]],
        }
        rich = await ask(emu, "", message_type="post", content=json.dumps(post), sender="u1")
        image = await ask(
            emu, "", message_type="image", content='{"image_key": "img_v3_x"}', sender="u2"
        )
        sticker = await ask(
            emu, "", message_type="sticker", content='{"file_key": "s"}', sender="u3"
        )
        prompt = "Please write your question after mentioning me."
        for sent, expected in ((rich, "Q: rich words"), (image, "Q: "), (sticker, prompt)):
            card = await final_card(emu, sent)
            assert answer(card) == expected
        [attachment] = (await settled(gateway, image)).message.attachments
        assert (attachment.kind, attachment.url) == ("image", "img_v3_x")


# -- 2. re-pushes, multi-part payloads -------------------------------------------------------------


async def test_a_re_pushed_event_is_acked_again_and_answered_once(
    start: Start, emu: FeishuEmulator, gateway: Gateway
) -> None:
    async with asyncio.timeout(15):
        await start(agent={"type": "echo", "delay": 0.05})
        sent = await ask(emu, "answer me only once please")
        during = await emu.redeliver(sent.event_id)  # while the answer streams
        card = await final_card(emu, sent)
        after = await emu.redeliver(sent.event_id)  # after it was answered
        await emu.wait_until(lambda: {during, after} <= {a.frame_id for a in emu.acks if a.ok}, 3)
        await asyncio.sleep(0.3)
        assert emu.deliveries(sent.event_id) == 3
        assert len(emu.replies(sent.message_id or "")) == 1
        assert emu.count(CARDS, method="POST") == 1
        assert answer(card) == "answer me only once please"
        assert (await settled(gateway, sent)).attempts == 1
        assert emu.violations == []


async def test_an_event_the_driver_could_not_store_is_re_pushed_and_answered(
    start: Start, emu: FeishuEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu.ack_timeout = 0.3
    async with asyncio.timeout(10):
        runtime = await start()
        real_deliver = runtime.deliver
        attempts = 0

        async def flaky_deliver(message: Any) -> bool:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                raise OSError("disk I/O error")  # the inbox could not store it
            return await real_deliver(message)

        monkeypatch.setattr(runtime, "deliver", flaky_deliver)
        sent = await emu.send_message("store me next time")
        ack = await emu.wait_acked(sent.event_id, timeout=5)
        assert ack.frame_id != sent.frame_id, "the first frame must stay unacknowledged"
        card = await final_card(emu, sent)
        assert answer(card) == "store me next time"


async def test_a_payload_split_over_several_frames_is_put_together(
    start: Start, emu: FeishuEmulator
) -> None:
    emu.split_payload = 200  # bytes per frame: an event is ~1 KB
    async with asyncio.timeout(10):
        await start()
        text = "a long question " * 20
        sent = await ask(emu, text)
        card = await final_card(emu, sent)
        assert answer(card) == text.strip()
        frames = [a for a in emu.acks if a.event_id == sent.event_id]
        assert len(frames) == 1  # one ACK, for the frame that completed the payload


async def test_unreadable_payloads_are_acked_and_the_connection_survives(
    start: Start, emu: FeishuEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with asyncio.timeout(10):
        await start()
        [conn] = emu.live_connections
        garbage = [
            await emu.push_event(b"not json", repush=False),
            await emu.push_event(b"[1, 2]", repush=False),
            await emu.push_event(
                {
                    "schema": "2.0",
                    "header": {"event_type": "im.message.receive_v1", "event_id": "x1"},
                },
                repush=False,
            ),
            await emu.push_event(
                {"header": {"event_type": "contact.user.created_v3"}}, repush=False
            ),
            await emu.push_event(b"{", kind="card", repush=False),
        ]
        for delivery in garbage:
            ack = await emu.wait_acked(delivery.event_id, timeout=2)
            assert ack.code == 200  # a re-push of the same bytes would fail the same way
        sent = await ask(emu, "still answering")
        assert answer(await final_card(emu, sent)) == "still answering"
        assert emu.live_connections == [conn]
    assert caplog.text.count("acknowledging an unreadable") == 4
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- 3. feedback -----------------------------------------------------------------------------------


async def test_feedback_clicks_are_acked_with_a_toast_and_recorded(
    start: Start, emu: FeishuEmulator, gateway: Gateway
) -> None:
    async with asyncio.timeout(15):
        await start()
        sent = await ask(emu, "rate this answer", sender="alice")
        card = await final_card(emu, sent)
        await emu.wait_until(lambda: card.shows_buttons, 3)
        values = [b["behaviors"][0]["value"] for b in card.buttons]

        response = await emu.click_card(card.card_id, "carol", values[1])
        assert response == {"toast": {"type": "success", "content": "感谢反馈：😊 有帮助"}}
        click = emu.card_clicks[-1]
        assert click.acked_at is not None and click.acked_at - click.sent_at < 3.0
        [row] = await gateway.feedback.rows("bot")
        carol = emu.user("carol").open_id
        assert (row.user_id, row.rating, row.question, row.answer) == (
            carol,
            "helpful",
            "rate this answer",
            "rate this answer",
        )
        assert (row.message_id, row.reply_id) == (
            sent.message_id,
            reply_id_for(sent.message_id or ""),
        )

        await emu.click_card(card.card_id, "carol", values[3])  # changes their mind
        [row] = await gateway.feedback.rows("bot")
        assert (row.user_id, row.rating) == (carol, "unhelpful")

        # Another card action is acknowledged in time and records nothing.
        assert await emu.click_card(card.card_id, "dave", {"action": "share"}) is None
        assert emu.card_clicks[-1].acked_at is not None
        assert len(await gateway.feedback.rows("bot")) == 1
        assert emu.violations == []


# -- 4. platform errors: rate limits, tokens, 5xx, cards that cannot be made --------------------------


async def test_rate_limits_expired_tokens_and_server_errors_are_retried(
    start: Start, emu: FeishuEmulator
) -> None:
    async with asyncio.timeout(20):
        await start(agent={"type": "echo", "delay": 0.1})
        text = "retry every transient failure please"
        emu.fail_next(CARDS, count=1, http_status=429)  # the create: the whole app pauses ~1 s
        sent = await ask(emu, text)
        await emu.wait_until(lambda: card_of(emu, sent) is not None, 5)
        emu.expire_tokens()  # the next call finds its token rejected (99991663)
        emu.fail_next(CARDS + "/", count=2, http_status=503)
        card = await final_card(emu, sent)
        await emu.wait_until(lambda: card.shows_buttons, 5)
        assert answer(card) == text
        assert emu.count(CARDS, status=429) == 1
        assert emu.count(CARDS + "/", status=503) == 2
        assert emu.tokens_issued == 2
        assert any(c.code == 99991663 for c in emu.calls)
        assert len(emu.replies(sent.message_id or "")) == 1
        assert emu.count(CARDS, method="POST", status=200) == 1
        assert emu.violations == []


async def test_cards_that_cannot_be_made_fall_back_to_messages_and_degrade(
    start: Start, emu: FeishuEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    async with asyncio.timeout(20):
        await start(settings={"degrade_after": 2, "degrade_for": 1.5})
        emu.fail_next(CARDS, count=2, http_status=400, code=99991672, msg="Access denied")
        for i in (1, 2):
            sent = await ask(emu, f"card broken {i}", sender=f"u{i}")
            [reply] = await replies(emu, sent)
            assert (reply.msg_type, message_text(reply)) == ("post", f"card broken {i}")
        degraded_at = time.monotonic()
        assert emu.count(CARDS, method="POST") == 2

        sent = await ask(emu, "no card tried", sender="u3")
        [reply] = await replies(emu, sent)
        assert message_text(reply) == "no card tried"
        assert time.monotonic() - degraded_at < 1.5, "too slow to observe the degraded period"
        assert emu.count(CARDS, method="POST") == 2  # straight to a message

        await asyncio.sleep(max(0.0, degraded_at + 1.6 - time.monotonic()))
        sent = await ask(emu, "cards are back", sender="u4")
        card = await final_card(emu, sent)
        assert answer(card) == "cards are back"
        assert [m.msg_type for m in emu.replies(sent.message_id or "")] == ["interactive"]
    assert "card failures in a row" in caplog.text


async def test_an_agent_error_ends_the_card_with_the_reason_and_no_buttons(
    start: Start, emu: FeishuEmulator
) -> None:
    async with asyncio.timeout(10):
        await start(agent={"type": "scripted", "then": "agent"})
        sent = await ask(emu, "fail please")
        card = await final_card(emu, sent)
        assert (
            answer(card) == "scripted answer" + ERROR_MARK + "The scripted agent failed on purpose."
        )
        await asyncio.sleep(0.2)
        assert not card.shows_buttons
        assert emu.violations == []


async def test_a_card_whose_streaming_feishu_timed_out_is_reopened_and_finished(
    start: Start, emu: FeishuEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Feishu closes streaming by itself (after 10 minutes; here 0.6 s): updates turn it on again,
    the answer ends in the same card with its buttons, and no message replaces it."""
    caplog.set_level(logging.INFO)
    emu.streaming_timeout = 0.6
    async with asyncio.timeout(20):
        chunks = [f"part {i} " for i in range(8)]
        await start(agent={"type": "scripted", "chunks": chunks, "delay": 0.25})
        sent = await ask(emu, "a slow answer")
        card = await final_card(emu, sent)
        await emu.wait_until(lambda: card.shows_buttons, 3)
        assert answer(card) == "".join(chunks)
        assert emu.count(CARDS + "/", status=400) >= 1  # Feishu did close streaming
        assert any(c.code == 200850 for c in emu.calls)
        reopened = [
            u
            for u in card.history
            if u.kind == "settings" and '"streaming_mode": true' in u.content
        ]
        assert reopened
        assert [m.msg_type for m in emu.replies(sent.message_id or "")] == ["interactive"]
        assert emu.violations == []  # never streamed into a closed card after being told
    assert "card_failed" not in [getattr(r, "event", "") for r in caplog.records]
    assert "continues as a message" not in caplog.text


async def test_a_timeout_before_the_last_update_ends_the_card_with_a_full_update(
    start: Start, emu: FeishuEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with asyncio.timeout(15):
        await start(
            agent={
                "type": "scripted",
                "chunks": ["the first half ", "the second half"],
                "delay": 0.5,
            }
        )
        sent = await ask(emu, "two halves")
        await emu.wait_until(
            lambda: (c := card_of(emu, sent)) is not None and c.content_updates >= 1, 3
        )
        card = card_of(emu, sent)
        assert card is not None
        emu.expire_streaming(card.card_id)  # Feishu's 10 minutes are up now
        card = await final_card(emu, sent)
        await emu.wait_until(lambda: card.shows_buttons, 3)
        assert answer(card) == "the first half the second half"
        # The final text, streaming off and the buttons in one full update (no streaming needed).
        assert card.history[-1].kind == "update"
        assert [m.msg_type for m in emu.replies(sent.message_id or "")] == ["interactive"]
        assert emu.violations == []
    assert "continues as a message" not in caplog.text


async def test_a_resumed_card_that_was_sent_before_the_crash_is_updated_not_resent(
    start: Start, emu: FeishuEmulator, app: str
) -> None:
    """A crash between sending a card and recording it: more than an hour later (Feishu's uuid
    window), sending it again is refused, as a card is sent once; the reply takes it as sent."""
    emu.uuid_window = 0.0
    async with asyncio.timeout(15):
        runtime = await start()
        api = runtime.driver.api  # type: ignore[attr-defined]
        payload = emu.message("resume me please", sender="alice")
        message_id = payload["event"]["message"]["message_id"]
        key = f"{reply_id_for(message_id)}.0"
        # What the crashed process did: create the card and send it (with the reply's uuid);
        # the record of the send never reached the disk.
        thinking = {
            "schema": "2.0",
            "config": {"streaming_mode": True},
            "body": {"elements": [{"tag": "markdown", "element_id": "answer", "content": "…"}]},
        }
        created = await api.call("POST", CARDS, {"type": "card_json", "data": json.dumps(thinking)})
        card_id = str(created["card_id"])
        chat_id = payload["event"]["message"]["chat_id"]
        emu.received[message_id] = Delivery("ev_0", payload, app, message_id, chat_id)
        reference = json.dumps({"type": "card", "data": {"card_id": card_id}})
        await api.call(
            "POST",
            f"{REPLY}{message_id}/reply",
            {"msg_type": "interactive", "content": reference, "uuid": send_uuid(key)},
        )
        await CardStore(runtime.state_dir / "cards").put(key, CardRecord(card_id, time.time() - 1))
        pushed = await emu.push_event(payload)
        await emu.wait_acked(pushed.event_id)
        card = emu.cards[card_id]
        await emu.wait_until(lambda: card.finished and card.shows_buttons, 5)
        assert answer(card) == "resume me please"
        assert len(emu.replies(message_id)) == 1  # the one card, sent once
        assert any(c.code == 230099 for c in emu.calls)  # Feishu refused the second send
        assert emu.count(CARDS, method="POST", status=200) == 1  # no second card
        assert emu.violations == []


async def test_bad_pacing_and_text_length_settings_are_refused_readably(
    emu: FeishuEmulator, app: str, tmp_path: Path
) -> None:
    settings = {
        **feishu_settings(emu, app_id=app, app_secret=SECRET),
        "card_update_interval": 0,
        "max_text_length": 50000,
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"type": "feishu", "settings": settings}))
    with pytest.raises(ConfigError) as caught:
        load_instance(path, REGISTRY, env={})
    problems = {p.key: p.message for p in caught.value.problems}
    assert (
        "at least 0.1 s: Feishu allows 10 operations a second"
        in (problems["settings.card_update_interval"])
    )
    assert "between 100 and 6000 characters" in problems["settings.max_text_length"]


# -- 5. connections --------------------------------------------------------------------------------


async def test_a_dropped_connection_is_reconnected_at_once_and_nothing_is_lost(
    start: Start, emu: FeishuEmulator
) -> None:
    emu.ack_timeout = 0.5
    async with asyncio.timeout(20):
        runtime = await start(agent={"type": "echo", "delay": 0.05})
        first = [await emu.send_message(f"before the drop {i}", sender=f"u{i}") for i in range(5)]
        dropped = time.monotonic()
        assert await emu.drop_connections() == 1
        await emu.wait_connected(timeout=3)
        assert time.monotonic() - dropped < 1.0, "the driver must reconnect at once"
        second = [await emu.send_message(f"after the drop {i}", sender=f"v{i}") for i in range(5)]
        for sent in first + second:
            card = await final_card(emu, sent)
            assert answer(card) == json.loads(sent.payload["event"]["message"]["content"])["text"]
            assert len(emu.replies(sent.message_id or "")) == 1
        assert runtime.status.reconnects >= 1
        assert emu.violations == []


async def test_a_silent_connection_is_given_up_after_frame_timeout(
    start: Start, emu: FeishuEmulator
) -> None:
    async with asyncio.timeout(10):
        runtime = await start(settings={"frame_timeout": 0.6})
        emu.stop_pongs = True  # a half-open socket: nothing comes back
        await emu.wait_until(lambda: len(emu.connection_history) >= 2, 4)
        emu.stop_pongs = False
        await wait_connected(runtime)
        assert emu.connection_history[0].closed_by == "client"
        assert runtime.status.reconnects >= 1


async def test_pings_follow_the_interval_feishu_configures(
    start: Start, emu: FeishuEmulator
) -> None:
    emu.ping_interval = 1  # sent in every pong's ClientConfig
    async with asyncio.timeout(10):
        await start(settings={"frame_timeout": 30.0})
        await asyncio.sleep(2.5)
        times = [p.time for p in emu.pings]
        # At once, then every second: neither Feishu's default 120 s nor frame_timeout / 2.
        assert 3 <= len(times) <= 4, times
        assert all(0.7 < b - a < 2.0 for a, b in itertools.pairwise(times))


async def test_endpoint_refusals_are_retried_until_feishu_accepts(
    start: Start, emu: FeishuEmulator
) -> None:
    emu.refuse_connections = True  # code 1, "system busy"
    async with asyncio.timeout(10):
        runtime = await start(connected=False)
        await emu.wait_until(lambda: emu.count("/callback/ws/endpoint") >= 3, 5)
        assert runtime.status.state is not InstanceState.CONNECTED
        assert "busy" in runtime.status.last_error
        emu.refuse_connections = False
        await wait_connected(runtime)
        sent = await ask(emu, "finally connected")
        assert answer(await final_card(emu, sent)) == "finally connected"


async def test_wrong_credentials_fail_readably_without_the_secret(
    start: Start, emu: FeishuEmulator, app: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-secret-71d0e5aa93"
    async with asyncio.timeout(10):
        runtime = await start(settings={"app_secret": wrong}, connected=False)
        async with asyncio.timeout(5):
            while runtime.status.state is not InstanceState.FAILED:
                await asyncio.sleep(0.01)
        error = runtime.status.last_error
        assert error.startswith("AuthenticationError: ")
        assert app in error and "app id/secret" in error
        assert wrong not in error
    assert emu.live_connections == []
    assert wrong not in caplog.text
    assert all(wrong not in r.getMessage() for r in caplog.records)


async def test_endpoint_refusals_that_need_a_fix_are_reported_as_such(
    start: Start, emu: FeishuEmulator, app: str
) -> None:
    async with asyncio.timeout(10):
        # 514: the endpoint itself rejects the credentials (the token call may still work).
        emu.fail_next(
            "/callback/ws/endpoint", count=1, http_status=200, code=514, msg="auth failed"
        )
        runtime = await start(connected=False)
        await emu.wait_until(lambda: "AuthenticationError" in runtime.status.last_error, 5)
        assert "instance bot" in runtime.status.last_error and app in runtime.status.last_error
        await wait_connected(runtime)  # retried at the slow pace: fixing it recovers

        # 1000040350: the app's connections (50 on Feishu) are all taken elsewhere.
        emu.max_connections = 0
        await emu.drop_connections()
        await emu.wait_until(lambda: "DriverConfigError" in runtime.status.last_error, 5)
        assert "too many long connections" in runtime.status.last_error


async def test_stop_closes_the_connection_within_a_second(
    start: Start, emu: FeishuEmulator, gateway: Gateway
) -> None:
    async with asyncio.timeout(10):
        runtime = await start()
        began = time.monotonic()
        await gateway.stop("bot", grace=0)
        assert time.monotonic() - began < 1.0
        assert runtime.status.state is InstanceState.STOPPED
        await emu.wait_until(lambda: not emu.live_connections, 2)
        assert [c.closed_by for c in emu.connection_history] == ["client"]


async def test_stop_waits_for_the_ack_of_a_message_being_stored(
    start: Start, emu: FeishuEmulator, gateway: Gateway
) -> None:
    """A message stored but not ACKed would be pushed again, perhaps to another replica that
    answers it a second time: closing lets it finish storing and ACK before the socket closes."""
    emu.ack_timeout = 0.5
    async with asyncio.timeout(10):
        runtime = await start()
        storing = slow_store(runtime, 0.3)
        sent = await emu.send_message("stored while stopping")
        await storing.wait()
        await gateway.stop("bot", grace=0)
        assert runtime.status.state is InstanceState.STOPPED
        assert emu.acked(sent.event_id), "the stored message was not acknowledged"
        await asyncio.sleep(0.8)  # longer than the ACK timeout: no re-push
        assert emu.deliveries(sent.event_id) == 1
        assert await gateway.inbox.entry("bot", sent.message_id or "") is not None


async def test_short_lived_credentials_never_reach_the_logs(
    start: Start, emu: FeishuEmulator
) -> None:
    async with asyncio.timeout(10):
        await start()
        sent = await ask(emu, "mask them")
        await final_card(emu, sent)
    [url] = [c.response["data"]["URL"] for c in emu.calls if c.path == "/callback/ws/endpoint"]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    ticket, access_key = query["ticket"][0], query["access_key"][0]
    tokens = [
        c.response["tenant_access_token"] for c in emu.calls if "tenant_access_token" in c.path
    ]
    failure = f"connection to {url} failed; Authorization: Bearer {tokens[0]}"
    shown = redact(failure)
    for credential in (ticket, access_key, *tokens):
        assert credential not in shown
    assert query["device_id"][0] in shown  # not a credential: still there to debug with


# -- 6. proactive messages -------------------------------------------------------------------------


async def test_proactive_messages_go_to_chats_and_users_once_per_idempotency_key(
    start: Start, emu: FeishuEmulator
) -> None:
    async with asyncio.timeout(10):
        runtime = await start()
        group = emu.add_chat("ops")
        bob = emu.user("bob")
        driver = runtime.driver

        def outgoing(**options: Any) -> Outgoing:
            return Outgoing.create(instance="bot", **options)

        first = await driver.send(
            outgoing(to=group.id, text="**deploy** done", markdown=True, idempotency_key="k1")
        )
        again = await driver.send(
            outgoing(to=group.id, text="**deploy** done", markdown=True, idempotency_key="k1")
        )
        assert first and first == again  # Feishu's uuid deduplicated the second send
        to_bob = await driver.send(outgoing(to=bob.open_id, text="hello bob", target="user"))
        sent = {m.message_id: m for m in emu.messages}
        assert (sent[first].chat_id, sent[first].msg_type) == (group.id, "post")
        assert message_text(sent[first]) == "**deploy** done"
        assert (sent[to_bob].receive_id_type, sent[to_bob].receive_id) == ("open_id", bob.open_id)
        assert (sent[to_bob].msg_type, sent[to_bob].text) == ("text", "hello bob")

        with pytest.raises(SendRejected, match="230002"):
            await driver.send(outgoing(to="oc_unknown", text="nobody is there"))
        with pytest.raises(SendRejected, match="230013"):
            await driver.send(outgoing(to="ou_stranger", text="who?", target="user"))


# -- 7. text mode and the proxy --------------------------------------------------------------------


async def test_text_mode_answers_each_part_with_one_markdown_message(
    start: Start, emu: FeishuEmulator
) -> None:
    async with asyncio.timeout(15):
        runtime = await start(
            settings={"reply_mode": "text", "max_text_length": 100},
            agent={"type": "echo", "delay": 0.01},
        )
        assert not runtime.driver.capabilities.edits
        text = " ".join(f"word{i:03d}" for i in range(30))  # 239 characters: three parts
        sent = await ask(emu, text)
        parts = await replies(emu, sent, count=3)
        await asyncio.sleep(0.3)
        parts = emu.replies(sent.message_id or "")
        assert [m.msg_type for m in parts] == ["post"] * len(parts)
        assert all(len(message_text(m)) <= 100 for m in parts)
        assert " ".join(message_text(m) for m in parts).split() == text.split()
        assert len({m.uuid for m in parts}) == len(parts)  # one Feishu de-dup key per part
        assert emu.cards == {}


async def test_everything_goes_through_the_configured_socks5_proxy(
    start: Start, emu: FeishuEmulator, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "pproxy.log"
    proxy = start_proxy(port, log)
    try:
        async with asyncio.timeout(20):
            await wait_port(port, proxy)
            runtime = await start(settings={"proxy": f"socks5://127.0.0.1:{port}"})
            sent = await ask(emu, "through the proxy")
            assert answer(await final_card(emu, sent)) == "through the proxy"
            # pproxy logs every connection it relays (-v): the websocket and the HTTP calls.
            relayed = f"-> 127.0.0.1:{emu.port}"
            await emu.wait_until(lambda: log.read_text().count(relayed) >= 2, 3)

            # Without the proxy the driver cannot reach Feishu at all.
            stop_proxy(proxy)
            await emu.wait_until(lambda: not emu.live_connections, 3)
            await asyncio.sleep(0.5)
            assert len(emu.connection_history) == 1
            assert runtime.status.state is InstanceState.RECONNECTING
    finally:
        stop_proxy(proxy)
