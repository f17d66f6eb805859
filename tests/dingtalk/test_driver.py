"""The ``dingtalk-stream`` driver end to end: the real core, the driver found through its entry point,
and the DingTalk emulator (real websocket and HTTP on 127.0.0.1).

Every test judges by what DingTalk would show or record (``emu.cards``, ``emu.sent``, ``emu.calls``,
``emu.acks``) and by what the core stored (inbox, feedback); every wait has a deadline.  Each test
uses its own app id, so the process-wide rate-limit bucket of one test never slows another.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import load_instances
from gateway.errors import ConfigError
from gateway.logs import redact
from gateway.plugins import PluginRegistry
from gateway.runtime import Gateway
from gateway.store.inbox import InboxEntry
from gateway.supervisor import InstanceState
from gateway_dingtalk.emulator import (
    BOT_TOPIC,
    CARD_TOPIC,
    CardState,
    DingTalkEmulator,
    SentMessage,
)
from gateway_testkit.dingtalk import TEMPLATE, TEMPLATE_VARIABLES, dingtalk_settings, reply_id_for
from gateway_testkit.inprocess import Start, instance_starter, running_gateway, slow_store
from gateway_testkit.process import free_port
from gateway_testkit.proxy import start_proxy, stop_proxy, wait_port

REGISTRY = PluginRegistry.discover()
SECRET = "dt-secret-5f1d9c7a0b"
THINKING = "thinking about it…"
LABELS = ["😄 非常有帮助", "😊 有帮助", "🙂 帮助不大", "😅 没帮助"]  # the driver's default labels
CREATE = "/v1.0/card/instances/createAndDeliver"
STREAMING = "/v1.0/card/streaming"
TOKEN = "/v1.0/oauth2/accessToken"

Factory = Callable[..., Awaitable[DingTalkEmulator]]


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def app() -> str:
    """A fresh client id per test (the driver's token bucket is process-wide, keyed by it)."""
    return f"ding{uuid.uuid4().hex[:16]}"


@pytest.fixture
async def emu(app: str, dingtalk_emulator_factory: Factory) -> DingTalkEmulator:
    return await dingtalk_emulator_factory(
        apps={app: SECRET}, templates={TEMPLATE: TEMPLATE_VARIABLES}, ack_timeout=1.0, seed=11
    )


@pytest.fixture
async def gateway(tmp_path: Path, emu: DingTalkEmulator) -> AsyncIterator[Gateway]:
    # Depends on ``emu``: the gateway is closed first, while the emulator still answers.
    async with running_gateway(tmp_path / "state") as gw:
        yield gw


@pytest.fixture
def start(gateway: Gateway, emu: DingTalkEmulator, app: str, tmp_path: Path) -> Start:
    settings = {
        **dingtalk_settings(emu, client_id=app, client_secret=SECRET),
        "thinking_text": THINKING,
        "card_update_interval": 0.02,
    }
    return instance_starter(gateway, tmp_path, "dingtalk-stream", settings, REGISTRY)


# -- helpers -------------------------------------------------------------------------------------


async def ask(emu: DingTalkEmulator, text: str = "hi", **options: Any) -> SentMessage:
    """Push a robot message and wait for the driver's ack."""
    sent = await emu.send_message(text=text, **options)
    assert sent.delivered
    await emu.wait_acked(sent.msg_id, timeout=5)
    return sent


def track(sent: SentMessage | str, part: int = 0) -> str:
    """The ``outTrackId`` of the card (part ``part``) answering ``sent``."""
    rid = reply_id_for(sent if isinstance(sent, str) else sent.msg_id)
    return rid if part == 0 else f"{rid}.{part}"


async def ended_card(
    emu: DingTalkEmulator, sent: SentMessage, *, feedback: bool = False, timeout: float = 10
) -> CardState:
    """The first card of ``sent`` once it is finished or failed (and shows its feedback buttons)."""
    out = track(sent)

    def done() -> bool:
        card = emu.cards.get(out)
        return (
            card is not None
            and card.ended
            and (not feedback or card.param_map.get("feedback") == "1")
        )

    await emu.wait_until(done, timeout)
    return emu.cards[out]


def creates(emu: DingTalkEmulator, out_track_id: str, status: int | None = None) -> list[Any]:
    return [
        call
        for call in emu.calls
        if call.path == CREATE
        and isinstance(call.body, dict)
        and call.body.get("outTrackId") == out_track_id
        and (status is None or call.status == status)
    ]


def finalizations(card: CardState) -> int:
    return sum(1 for update in card.history if update.is_finalize or update.is_error)


async def settled(gateway: Gateway, sent: SentMessage, timeout: float = 10) -> InboxEntry:
    """The inbox entry once the core recorded the outcome (after the reply ended)."""
    async with asyncio.timeout(timeout):
        while True:
            entry = await gateway.inbox.entry("bot", sent.msg_id)
            if entry is not None and entry.outcome is not None:
                return entry
            await asyncio.sleep(0.01)


async def wait_replies(emu: DingTalkEmulator, predicate: Callable[[Any], bool], count: int = 1):
    await emu.wait_until(lambda: len([r for r in emu.sent if predicate(r)]) >= count, 10)
    return [r for r in emu.sent if predicate(r)]


# -- 1. cards: created at once, streamed, finished with feedback, in the right space --------------


async def test_a_group_mention_gets_a_streamed_ai_card_with_feedback_buttons(
    start: Start, emu: DingTalkEmulator, gateway: Gateway, app: str
) -> None:
    async with asyncio.timeout(20):
        await start(agent={"type": "echo", "delay": 0.1})
        text = "one two three four five six seven eight"
        sent = await ask(
            emu, text, conversation_type="2", sender_staff_id="alice", sender_nick="Alice"
        )
        assert sent.data["text"]["content"] == " " + text  # DingTalk's leading space in groups

        # The "thinking" card is there long before the agent (0.8 s) is done.
        await emu.wait_until(lambda: track(sent) in emu.cards, 1.0)
        card = emu.cards[track(sent)]
        assert card.history[0].source == "create"
        assert card.history[0].changes["content"] == THINKING
        assert card.history[0].changes["feedback"] == "0"
        assert not card.ended

        card = await ended_card(emu, sent, feedback=True)
        assert card.status == "finished"
        assert card.content["content"] == text
        assert card.param_map["feedback"] == "1"
        assert card.streaming_calls >= 2
        partial = [u for u in card.history if u.source == "streaming" and not u.is_finalize]
        assert partial, card.history
        assert all(text.startswith(u.changes["content"]) for u in partial)
        assert finalizations(card) == 1
        assert card.callback_type == "STREAM"

        conversation = sent.data["conversationId"]
        assert card.spaces == [f"dtv1.card//IM_GROUP.{conversation}"]
        [create] = creates(emu, track(sent))
        assert create.body["imGroupOpenDeliverModel"]["robotCode"] == app
        assert create.body["imGroupOpenDeliverModel"]["atUserIds"] == {"alice": "Alice"}
        entry = await settled(gateway, sent)
        assert entry.message.text == text  # the leading space is gone
        assert entry.message.conversation_kind == "group"
        assert emu.violations == []


async def test_a_one_to_one_message_gets_its_card_in_the_robot_chat(
    start: Start, emu: DingTalkEmulator
) -> None:
    async with asyncio.timeout(10):
        await start()
        sent = await ask(emu, "hello in private", sender_staff_id="bob")
        card = await ended_card(emu, sent, feedback=True)
        assert (card.status, card.content["content"]) == ("finished", "hello in private")
        assert card.spaces == ["dtv1.card//IM_ROBOT.bob"]
        [create] = creates(emu, track(sent))
        assert create.body["imRobotOpenDeliverModel"] == {"spaceType": "IM_ROBOT"}
        assert "imGroupOpenDeliverModel" not in create.body
        assert emu.violations == []


# -- 2. every message type is answered -------------------------------------------------------------


async def test_every_message_type_is_answered(
    start: Start, emu: DingTalkEmulator, gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with asyncio.timeout(15):
        await start(agent={"type": "echo", "delay": 0, "prefix": "Q: "})
        rich = await ask(emu, "rich words", msgtype="richText", sender_staff_id="u1")
        picture = await ask(emu, "", msgtype="picture", sender_staff_id="u2")
        audio = await ask(emu, "what time is it", msgtype="audio", sender_staff_id="u3")
        unknown = await ask(emu, "", msgtype="unknownMsgType", sender_staff_id="u4")
        bare = await ask(emu, "", conversation_type="2", sender_staff_id="u5")  # a bare @bot
        prompt = "Please write your question after mentioning me."
        expected = {
            rich.msg_id: "Q: rich words",
            picture.msg_id: "Q: ",
            audio.msg_id: "Q: what time is it",
            unknown.msg_id: prompt,
            bare.msg_id: prompt,
        }
        for sent in (rich, picture, audio, unknown, bare):
            card = await ended_card(emu, sent)
            assert (card.status, card.content["content"]) == ("finished", expected[sent.msg_id])

        rich_entry = await settled(gateway, rich)
        [attachment] = rich_entry.message.attachments
        assert attachment.kind == "picture"
        assert downloadable(emu, attachment.url, sent_code(rich))
        picture_entry = await settled(gateway, picture)
        assert picture_entry.message.text == ""
        [attachment] = picture_entry.message.attachments
        assert attachment.kind == "picture"
        assert downloadable(emu, attachment.url, picture.data["content"]["downloadCode"])
        audio_entry = await settled(gateway, audio)
        assert audio_entry.message.text == "what time is it"
        assert [a.kind for a in audio_entry.message.attachments] == ["audio"]
        for sent in (unknown, bare):
            entry = await settled(gateway, sent)
            assert (entry.message.text, entry.message.attachments) == ("", ())
            assert entry.outcome == "answered"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert emu.violations == []


async def test_the_agent_gets_download_urls_not_download_codes(
    start: Start, emu: DingTalkEmulator
) -> None:
    async with asyncio.timeout(10):
        await start(agent={"type": "scripted", "attachments": True})
        picture = await ask(emu, "", msgtype="picture", sender_staff_id="u2")
        card = await ended_card(emu, picture)
        url = card.content["content"]
        assert url.startswith(f"{emu.url}/files/"), url
        assert emu.count("/v1.0/robot/messageFiles/download", status=200) == 1
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 200 and await response.read()


def downloadable(emu: DingTalkEmulator, url: str, code: str) -> bool:
    """``url`` is DingTalk's download code of the file, or the download URL it resolves to."""
    return url == code or url.startswith(f"{emu.url}/files/")


def sent_code(sent: SentMessage) -> str:
    """The download code of the (first) picture of a richText message."""
    return next(i["downloadCode"] for i in sent.data["content"]["richText"] if "downloadCode" in i)


# -- 3. feedback clicks ----------------------------------------------------------------------------


async def test_feedback_clicks_are_acked_with_the_card_update_and_recorded(
    start: Start, emu: DingTalkEmulator, gateway: Gateway
) -> None:
    async with asyncio.timeout(15):
        await start()
        sent = await ask(emu, "rate this answer", sender_staff_id="alice")
        card = await ended_card(emu, sent, feedback=True)

        response = await emu.click_card(
            None, card.out_track_id, "carol", params={"rating": "helpful"}
        )
        assert response == {
            "cardData": {"cardParamMap": {"feedback": "0", "rating": LABELS[1]}},
            "cardUpdateOptions": {"updateCardDataByKey": True},
        }
        click = emu.card_clicks[-1]
        assert click.within_limit and click.applied
        assert click.acked_at is not None and click.acked_at - click.sent_at < 2.0
        assert (card.param_map["feedback"], card.param_map["rating"]) == ("0", LABELS[1])
        assert card.content["content"] == "rate this answer"  # the answer itself is untouched
        [row] = await gateway.feedback.rows("bot")
        assert (row.user_id, row.rating, row.question, row.answer) == (
            "carol",
            "helpful",
            "rate this answer",
            "rate this answer",
        )
        assert (row.message_id, row.reply_id) == (sent.msg_id, track(sent))

        # The same user changes their mind: the row is replaced.
        await emu.click_card(None, card.out_track_id, "carol", params={"rating": "unhelpful"})
        [row] = await gateway.feedback.rows("bot")
        assert (row.user_id, row.rating) == ("carol", "unhelpful")
        assert card.param_map["rating"] == LABELS[3]

        # A template without request parameters: the action id names the button.
        response = await emu.click_card(None, card.out_track_id, "dave", action_ids=["feedback3"])
        assert response["cardData"]["cardParamMap"] == {"feedback": "0", "rating": LABELS[2]}
        rows = {r.user_id: r.rating for r in await gateway.feedback.rows("bot")}
        assert rows == {"carol": "unhelpful", "dave": "not_helpful"}

        # A click the driver cannot map is still acknowledged in time, and records nothing.
        response = await emu.click_card(None, card.out_track_id, "erin", action_ids=["share"])
        assert response is None
        assert emu.card_clicks[-1].within_limit
        assert len(await gateway.feedback.rows("bot")) == 2
        assert all(c.within_limit for c in emu.card_clicks)
        assert emu.violations == []


# -- 4. redelivery ---------------------------------------------------------------------------------


async def test_a_redelivered_message_is_acked_again_and_answered_once(
    start: Start, emu: DingTalkEmulator, gateway: Gateway
) -> None:
    async with asyncio.timeout(15):
        await start(agent={"type": "echo", "delay": 0.05})
        sent = await ask(emu, "answer me only once please")
        during = await emu.redeliver(sent.msg_id)  # while the answer streams
        assert during.frame_id != sent.frame_id
        assert (await emu.wait_acked(during.frame_id)).code == 200
        card = await ended_card(emu, sent, feedback=True)
        after = await emu.redeliver(sent.msg_id)  # after it was answered
        assert (await emu.wait_acked(after.frame_id)).code == 200
        await asyncio.sleep(0.3)

        assert emu.deliveries(sent.msg_id) == 3
        assert [t for t in emu.cards if t.startswith(track(sent))] == [track(sent)]
        assert len(creates(emu, track(sent))) == 1
        assert finalizations(card) == 1
        assert card.content["content"] == "answer me only once please"
        entry = await settled(gateway, sent)
        assert entry.attempts == 1
        assert emu.violations == []


async def test_a_message_the_driver_could_not_store_is_redelivered_and_answered(
    start: Start, emu: DingTalkEmulator, monkeypatch: pytest.MonkeyPatch
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
        sent = await emu.send_message(text="store me next time")
        ack = await emu.wait_acked(sent.msg_id, timeout=5)  # the first successful ack
        assert ack.frame_id != sent.frame_id, "the first frame must stay unacknowledged"
        assert emu.deliveries(sent.msg_id) == 2
        card = await ended_card(emu, sent)
        assert card.content["content"] == "store me next time"
        assert len(creates(emu, track(sent))) == 1


# -- 5./6./7. connections: drops, disconnects, dead sockets ----------------------------------------


async def test_a_dropped_connection_mid_burst_loses_and_duplicates_nothing(
    start: Start, emu: DingTalkEmulator
) -> None:
    emu.ack_timeout = 0.5  # frames the driver could not ack on the dead socket come back soon
    async with asyncio.timeout(30):
        runtime = await start(
            agent={"type": "echo", "delay": 0.1}, conversation={"concurrency": 32}
        )
        words = "alpha beta gamma delta epsilon"
        texts = [f"{words} {i}" for i in range(20)]
        burst = [
            await emu.send_message(text=texts[i], sender_staff_id=f"user{i}") for i in range(10)
        ]
        dropped = time.monotonic()
        assert await emu.drop_connections() == 1
        await emu.wait_connection_opens(2, timeout=3)
        assert time.monotonic() - dropped < 1.0, "the driver must reconnect at once"
        burst += [
            await emu.send_message(text=texts[i], sender_staff_id=f"user{i}") for i in range(10, 20)
        ]

        def all_ended() -> bool:
            return all(track(s) in emu.cards and emu.cards[track(s)].ended for s in burst)

        await emu.wait_until(all_ended, 20)
        await asyncio.sleep(0.2)
        for sent, text in zip(burst, texts, strict=True):
            card = emu.cards[track(sent)]
            assert (card.status, card.content["content"]) == ("finished", text)
            assert finalizations(card) == 1
            assert len(creates(emu, track(sent))) == 1, sent.msg_id
            assert emu.acked(sent.msg_id)
        assert len(emu.cards) == 20
        assert emu.sent == []  # no markdown fallback either
        assert runtime.status.reconnects >= 1
        assert emu.misrouted_acks == []


async def test_a_connection_dropped_while_a_message_is_being_stored_still_answers_it(
    start: Start, emu: DingTalkEmulator, gateway: Gateway
) -> None:
    """The socket dies while the inbox write of a message is queued behind a slow commit.  The write
    completes anyway (cancelling a caller does not cancel a queued write), so the message must still
    be answered: its redelivery is only a duplicate."""
    emu.ack_timeout = 0.3
    async with asyncio.timeout(10):
        await start()
        db = gateway.inbox._db  # the shared state database
        slow_disk = asyncio.ensure_future(db.write(lambda _conn: time.sleep(0.8)))
        await asyncio.sleep(0.05)
        sent = await emu.send_message(text="stored while the socket dies")
        await asyncio.sleep(0.2)  # the driver is inside deliver(), waiting for the commit
        await emu.drop_connections()
        await slow_disk
        card = await ended_card(emu, sent, timeout=5)
        assert (card.status, card.content["content"]) == (
            "finished",
            "stored while the socket dies",
        )
        assert len(creates(emu, track(sent))) == 1


async def test_stop_waits_for_the_ack_of_a_message_being_stored(
    start: Start, emu: DingTalkEmulator, gateway: Gateway
) -> None:
    """A message stored but not acknowledged would be delivered again, perhaps to another replica
    that answers it a second time: closing lets it finish storing and ACK before the socket
    closes."""
    emu.ack_timeout = 0.5
    async with asyncio.timeout(10):
        runtime = await start()
        storing = slow_store(runtime, 0.3)
        sent = await emu.send_message(text="stored while stopping")
        await storing.wait()
        await gateway.stop("bot", grace=0)
        assert runtime.status.state is InstanceState.STOPPED
        assert emu.acked(sent.msg_id), "the stored message was not acknowledged"
        await asyncio.sleep(0.8)  # longer than the ack timeout: no redelivery
        assert emu.deliveries(sent.msg_id) == 1
        assert await gateway.inbox.entry("bot", sent.msg_id) is not None


async def test_the_access_token_and_the_stream_ticket_never_reach_the_logs(
    start: Start, emu: DingTalkEmulator
) -> None:
    async with asyncio.timeout(10):
        await start()
        await ended_card(emu, await ask(emu, "mask them"))
    tickets = [c.response["ticket"] for c in emu.calls if c.path.endswith("/connections/open")]
    tokens = [c.response["accessToken"] for c in emu.calls if c.path == TOKEN]
    assert tickets and tokens
    failure = (
        f"stream connection failed: wss://127.0.0.1/connect?ticket={tickets[0]}; "
        f"x-acs-dingtalk-access-token: {tokens[0]}"
    )
    shown = redact(failure)
    for credential in (*tickets, *tokens):
        assert credential not in shown
    assert "stream connection failed" in shown


async def test_a_system_disconnect_is_acked_and_reconnected_at_once(
    start: Start, emu: DingTalkEmulator
) -> None:
    async with asyncio.timeout(10):
        await start()
        [old] = emu.connections
        asked = time.monotonic()
        await emu.send_disconnect(close_after=5.0)
        await emu.wait_connection_opens(2, timeout=2)
        assert time.monotonic() - asked < 1.0
        [ack] = [a for a in emu.acks if a.topic == "disconnect"]
        assert ack.code == 200 and ack.connection_id == old.id
        await emu.wait_until(lambda: not old.live, 2)
        assert old.closed_by == "client"  # the driver closed it, not the 5 s timeout
        sent = await ask(emu, "still there?")
        card = await ended_card(emu, sent)
        assert card.content["content"] == "still there?"
        assert emu.violations == []


async def test_a_message_being_stored_when_asked_to_reconnect_is_acked_on_its_socket(
    start: Start, emu: DingTalkEmulator
) -> None:
    """After SYSTEM/disconnect the old socket still carries ACKs until DingTalk closes it: a
    message being stored then is ACKed there, not left for DingTalk to push again."""
    emu.ack_timeout = 0.5
    async with asyncio.timeout(10):
        runtime = await start()
        [old] = emu.connections
        storing = slow_store(runtime, 0.3)
        sent = await emu.send_message(text="stored across a reconnect")
        await storing.wait()
        await emu.send_disconnect(close_after=5.0)
        ack = await emu.wait_acked(sent.msg_id, timeout=2)
        assert ack.connection_id == old.id
        await ended_card(emu, sent)
        await asyncio.sleep(0.8)  # longer than the ack timeout: no redelivery
        assert emu.deliveries(sent.msg_id) == 1


async def test_no_frame_for_frame_timeout_means_a_dead_socket(
    start: Start, emu: DingTalkEmulator
) -> None:
    emu.stop_pings()  # no SYSTEM pings, no websocket pongs: a half-open connection
    async with asyncio.timeout(10):
        runtime = await start(settings={"frame_timeout": 0.5})
        await emu.wait_connection_opens(2, timeout=3)
        assert runtime.status.reconnects > 0
        assert "ConnectionLost: no frame from DingTalk for 0.5 s" in runtime.status.last_error
        assert emu.connection_history[0].closed_by == "client"


async def test_system_pings_are_echoed_and_keep_the_connection(
    start: Start, emu: DingTalkEmulator
) -> None:
    emu.ping_interval = 0.15
    async with asyncio.timeout(10):
        runtime = await start(settings={"frame_timeout": 0.5})
        await asyncio.sleep(1.2)
        assert emu.connection_opens == 1
        assert runtime.status.reconnects == 0
        acked = [p for p in emu.pings if p.acked_at is not None]
        assert len(acked) >= 4
        assert all(p.ok for p in acked)
        assert emu.ping_mismatches == []


# -- 8./9./10. OpenAPI failures: tokens, quota, transient errors -----------------------------------


@pytest.mark.parametrize(
    ("status", "code"), [(400, "InvalidAuthentication"), (401, "Unauthorized")], ids=["400", "401"]
)
async def test_a_rejected_token_is_refreshed_and_the_call_retried(
    start: Start, emu: DingTalkEmulator, status: int, code: str
) -> None:
    async with asyncio.timeout(10):
        await start()
        emu.fail_next("/v1.0/card", status=status, code=code)
        sent = await ask(emu, "token please")
        card = await ended_card(emu, sent, feedback=True)
        assert (card.status, card.content["content"]) == ("finished", "token please")
        assert emu.count("/v1.0/card", status=status) == 1
        assert emu.count(TOKEN, status=200) == 2  # fetched again after the rejection
        assert len(creates(emu, track(sent), status=200)) == 1
        assert emu.sent == []


async def test_tokens_expiring_mid_answer_are_refreshed(
    start: Start, emu: DingTalkEmulator
) -> None:
    async with asyncio.timeout(15):
        await start(agent={"type": "echo", "delay": 0.1})
        text = "one two three four five six seven"
        sent = await ask(emu, text)
        await emu.wait_until(
            lambda: track(sent) in emu.cards and emu.cards[track(sent)].streaming_calls >= 1, 3
        )
        emu.expire_tokens()
        card = await ended_card(emu, sent, feedback=True)
        assert (card.status, card.content["content"]) == ("finished", text)
        assert emu.count("/v1.0/card", status=400) >= 1  # the real InvalidAuthentication
        assert emu.count(TOKEN, status=200) == 2
        assert emu.sent == []


async def test_a_qps_limit_storm_backs_off_and_every_card_finishes(
    start: Start, emu: DingTalkEmulator
) -> None:
    emu.qps_limit = 5  # per app and API, well below the driver's rate
    async with asyncio.timeout(40):
        await start(
            settings={"rate": 20.0},
            reply={"feedback": False},
            conversation={"concurrency": 32},
        )
        burst = await asyncio.gather(
            *(ask(emu, f"question number {i}", sender_staff_id=f"u{i}") for i in range(30))
        )

        def all_ended() -> bool:
            return all(track(s) in emu.cards and emu.cards[track(s)].ended for s in burst)

        await emu.wait_until(all_ended, 35)
        for i, sent in enumerate(burst):
            card = emu.cards[track(sent)]
            assert (card.status, card.content["content"]) == ("finished", f"question number {i}")
        assert emu.sent == []  # no card degraded to markdown
        calls = emu.count("/v1.0/card")
        rejected = emu.count("/v1.0/card", status=403)
        assert rejected == sum(emu.rejections.values())
        assert rejected > 0, "the storm did not happen: the test proves nothing"
        # The whole app paused after each 403 instead of every reply hammering on.
        assert rejected < 0.25 * calls, (rejected, calls, dict(emu.rejections))
        assert max(emu.rejections.values()) <= 3, dict(emu.rejections)


async def test_a_rate_below_the_qps_limit_is_never_rejected(
    start: Start, emu: DingTalkEmulator
) -> None:
    emu.qps_limit = 5
    async with asyncio.timeout(20):
        await start(
            settings={"rate": 4.0},
            reply={"feedback": False},
            conversation={"concurrency": 32},
        )
        burst = await asyncio.gather(
            *(ask(emu, f"slow and steady {i}", sender_staff_id=f"u{i}") for i in range(8))
        )

        def all_ended() -> bool:
            return all(track(s) in emu.cards and emu.cards[track(s)].ended for s in burst)

        await emu.wait_until(all_ended, 15)
        assert all(emu.cards[track(s)].status == "finished" for s in burst)
        assert emu.count("/v1.0/card", status=403) == 0, dict(emu.rejections)


async def test_transient_streaming_errors_are_retried(start: Start, emu: DingTalkEmulator) -> None:
    async with asyncio.timeout(15):
        await start(agent={"type": "echo", "delay": 0.05})
        emu.fail_next(STREAMING, count=2, status=500)
        sent = await ask(emu, "five words are enough here")
        card = await ended_card(emu, sent, feedback=True)
        assert (card.status, card.content["content"]) == ("finished", "five words are enough here")
        assert emu.count(STREAMING, status=500) == 2
        assert emu.sent == []


# -- 11./12. credentials and agent failures --------------------------------------------------------


async def test_wrong_credentials_fail_the_instance_readably_without_the_secret(
    start: Start, emu: DingTalkEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-secret-7c2e91ab44"
    async with asyncio.timeout(10):
        runtime = await start(settings={"client_secret": wrong}, connected=False)
        async with asyncio.timeout(5):
            while runtime.status.state is not InstanceState.FAILED:
                await asyncio.sleep(0.01)
        error = runtime.status.last_error
        assert error.startswith("AuthenticationError: ")
        assert "instance bot" in error and "client id/secret" in error
        assert wrong not in error
        await asyncio.sleep(0.3)  # a retry or two (capped backoff), still failing
        assert runtime.status.state is InstanceState.FAILED
    assert emu.connections == []
    assert emu.count("/v1.0/gateway/connections/open", status=401) >= 1
    assert "DingTalk rejected the client id/secret of instance bot" in caplog.text
    assert wrong not in caplog.text
    assert all(wrong not in r.getMessage() for r in caplog.records)


async def test_an_agent_error_ends_the_card_as_failed_with_the_reason(
    start: Start, emu: DingTalkEmulator
) -> None:
    async with asyncio.timeout(10):
        await start(agent={"type": "scripted", "then": "agent"})
        sent = await ask(emu, "fail please")
        card = await ended_card(emu, sent)
        assert card.status == "failed"
        assert card.content["content"] == (
            "scripted answer\n\n> The scripted agent failed on purpose."
        )
        assert card.history[-1].is_error
        assert card.param_map.get("feedback") == "0"  # no feedback buttons on a failure
        assert emu.violations == []


# -- 13. proxy -------------------------------------------------------------------------------------


async def test_everything_goes_through_the_configured_socks5_proxy(
    start: Start, emu: DingTalkEmulator, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "pproxy.log"
    proxy = start_proxy(port, log)
    try:
        async with asyncio.timeout(20):
            await wait_port(port, proxy)
            runtime = await start(settings={"proxy": f"socks5://127.0.0.1:{port}"})
            sent = await ask(emu, "through the proxy")
            card = await ended_card(emu, sent, feedback=True)
            assert card.content["content"] == "through the proxy"
            # pproxy logs every connection it relays (-v): the websocket and the HTTP calls.
            relayed = f"-> 127.0.0.1:{emu.port}"
            await emu.wait_until(lambda: log.read_text().count(relayed) >= 2, 3)

            # Without the proxy the driver cannot reach DingTalk at all.
            stop_proxy(proxy)
            await emu.wait_until(lambda: not emu.connections, 3)
            await asyncio.sleep(0.5)
            assert emu.connection_opens == 1
            assert runtime.status.state is InstanceState.RECONNECTING
    finally:
        stop_proxy(proxy)


# -- 14. malformed frames --------------------------------------------------------------------------


def frame(frame_type: str, topic: str, message_id: str, data: Any) -> dict[str, Any]:
    headers = {"contentType": "application/json", "messageId": message_id, "topic": topic}
    headers["time"] = str(int(time.time() * 1000))
    return {"specVersion": "1.0", "type": frame_type, "headers": headers, "data": data}


async def test_malformed_frames_are_logged_and_the_connection_survives(
    start: Start, emu: DingTalkEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with asyncio.timeout(10):
        await start()
        [conn] = emu.connections
        garbage: list[Any] = [
            "this is not json",
            "[1, 2, 3]",
            "null",
            json.dumps({"type": "CALLBACK"}),
            {"specVersion": "1.0", "type": "CALLBACK", "headers": "nope", "data": "{}"},
            {"specVersion": "1.0", "type": "CALLBACK", "headers": ["messageId"], "data": "{}"},
            frame("CALLBACK", BOT_TOPIC, "bad-json", "{not json"),
            frame("CALLBACK", BOT_TOPIC, "no-conversation", json.dumps({"msgtype": "text"})),
            frame("CALLBACK", BOT_TOPIC, "data-list", "[1, 2]"),
            frame("CALLBACK", BOT_TOPIC, "data-object", {"conversationId": "x"}),
            frame(
                "CALLBACK",
                BOT_TOPIC,
                "text-not-object",
                json.dumps(
                    {"conversationId": "c", "msgId": "m", "msgtype": "text", "text": "plain"}
                ),
            ),
            frame(
                "CALLBACK", CARD_TOPIC, "bad-card", json.dumps({"outTrackId": "x", "content": "{"})
            ),
            frame("SYSTEM", "ping", "bad-ping", "not json"),
            frame("EVENT", "*", "an-event", "{}"),
            frame("CALLBACK", "/v1.0/graph/api/invoke", "other-topic", "{}"),
        ]
        for item in garbage:
            await emu.push_frame(None, item, connection=conn.id)
        sent = await ask(emu, "still answering")
        card = await ended_card(emu, sent)
        assert card.content["content"] == "still answering"

        assert emu.connections == [conn] and emu.connection_opens == 1
        unreadable = ("bad-json", "no-conversation", "data-list", "data-object", "bad-card")
        for frame_id in (*unreadable, "bad-ping"):
            ack = await emu.wait_acked(frame_id, timeout=2)
            assert ack.code == 200, frame_id  # unreadable: a redelivery would be just as bad
        assert (await emu.wait_acked("an-event", timeout=2)).code == 200
        assert (await emu.wait_acked("other-topic", timeout=2)).code == 404
        logged = caplog.text
        assert logged.count("ignoring a malformed frame") == 5
        assert logged.count("acknowledging an unreadable robot message") == 5
        assert logged.count("acknowledging an unreadable system frame") == 1
        assert logged.count("ignoring an unreadable card callback") == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- 15. plain message modes and the legacy card ---------------------------------------------------


async def test_markdown_mode_answers_through_the_session_webhook_then_the_openapi(
    start: Start, emu: DingTalkEmulator, app: str
) -> None:
    async with asyncio.timeout(15):
        await start(
            settings={"reply_mode": "markdown", "card_template_id": ""},
            agent={"type": "echo", "delay": 0.05},
        )
        # A fresh webhook: the answer is one markdown message through it, @-ing the sender.
        sent = await ask(emu, "markdown answer please", conversation_type="2", sender_staff_id="al")
        [reply] = await wait_replies(emu, lambda r: r.in_reply_to == sent.msg_id)
        assert (reply.via, reply.msgtype, reply.text) == (
            "session",
            "markdown",
            "markdown answer please",
        )
        assert reply.title and reply.at == {"atUserIds": ["al"], "isAtAll": False}

        # A webhook about to expire: the OpenAPI group send, then the 1:1 batch send.
        late = await ask(emu, "late group answer", conversation_type="2", session_webhook_ttl=30)
        [group] = await wait_replies(emu, lambda r: r.text == "late group answer")
        assert (group.via, group.msg_key) == ("group", "sampleMarkdown")
        assert group.conversation_id == late.data["conversationId"]
        assert group.body["robotCode"] == app
        await ask(emu, "late private answer", sender_staff_id="bo", session_webhook_ttl=30)
        [single] = await wait_replies(emu, lambda r: r.text == "late private answer")
        assert (single.via, single.user_id, single.msg_key) == ("otm", "bo", "sampleMarkdown")

        # A webhook DingTalk expired before its announced time: the OpenAPI takes over.
        early = await ask(emu, "expired early answer", conversation_type="2")
        emu.expire_sessions()
        [fallback] = await wait_replies(emu, lambda r: r.text == "expired early answer")
        assert fallback.via == "group" and fallback.conversation_id == early.data["conversationId"]
        assert emu.cards == {}
        assert len(emu.sent) == 4


async def test_text_mode_sends_one_text_message(start: Start, emu: DingTalkEmulator) -> None:
    async with asyncio.timeout(10):
        await start(
            settings={"reply_mode": "text", "card_template_id": ""},
            agent={"type": "echo", "delay": 0.02},
        )
        sent = await ask(emu, "plain text answer", conversation_type="2", sender_staff_id="al")
        [reply] = await wait_replies(emu, lambda r: r.in_reply_to == sent.msg_id)
        assert (reply.via, reply.msgtype, reply.text) == ("session", "text", "plain text answer")
        assert reply.at == {"atUserIds": ["al"], "isAtAll": False}
        await asyncio.sleep(0.1)
        assert len(emu.sent) == 1 and emu.cards == {}


async def test_legacy_card_mode_sends_and_updates_an_interactive_card(
    start: Start, emu: DingTalkEmulator, gateway: Gateway
) -> None:
    async with asyncio.timeout(10):
        await start(
            settings={"reply_mode": "card", "card_template_id": ""},
            agent={"type": "echo", "delay": 0.05},
        )
        text = "legacy card answer with several words"
        sent = await ask(emu, text, conversation_type="2")
        await settled(gateway, sent)
        card = emu.cards[track(sent)]
        assert card.legacy and card.template_id == "StandardCard"
        assert card.spaces == [f"dtv1.card//IM_GROUP.{sent.data['conversationId']}"]
        assert card.history[0].changes["contents"][0]["text"] == THINKING
        assert card.param_map["contents"][0]["text"] == text
        assert card.param_map["header"]["title"]["text"] == text
        assert len([u for u in card.history if u.source == "legacy"]) >= 2
        assert emu.count("/v1.0/im/v1.0/robot/interactiveCards/send") == 1
        assert emu.violations == []


# -- 16. degrading to markdown ---------------------------------------------------------------------


async def test_failing_cards_degrade_to_markdown_for_a_while(
    start: Start, emu: DingTalkEmulator
) -> None:
    async with asyncio.timeout(15):
        await start(settings={"degrade_after": 2, "degrade_for": 1.5})
        emu.fail_next(CREATE, count=2, status=400, code="param.templateUnpublished")
        for i in (1, 2):
            sent = await ask(emu, f"card broken {i}", sender_staff_id=f"u{i}")
            [reply] = await wait_replies(emu, lambda r, s=sent: r.in_reply_to == s.msg_id)
            assert (reply.via, reply.msgtype, reply.text) == (
                "session",
                "markdown",
                f"card broken {i}",
            )
        degraded_at = time.monotonic()
        assert emu.count(CREATE) == 2 and emu.count(CREATE, status=400) == 2

        sent = await ask(emu, "no card tried", sender_staff_id="u3")
        [reply] = await wait_replies(emu, lambda r: r.in_reply_to == sent.msg_id)
        assert reply.text == "no card tried"
        assert time.monotonic() - degraded_at < 1.5, "too slow to observe the degraded period"
        assert emu.count(CREATE) == 2  # straight to markdown

        await asyncio.sleep(max(0.0, degraded_at + 1.6 - time.monotonic()))
        sent = await ask(emu, "cards are back", sender_staff_id="u4")
        card = await ended_card(emu, sent, feedback=True)
        assert (card.status, card.content["content"]) == ("finished", "cards are back")
        assert emu.count(CREATE) == 3
        assert emu.replies(sent.msg_id) == []


# -- 17. one app, one instance ---------------------------------------------------------------------


def test_two_instances_of_one_app_are_a_configuration_error(tmp_path: Path) -> None:
    folder = tmp_path / "instances"
    folder.mkdir()
    body = (
        'type = "dingtalk-stream"\n[settings]\nclient_id = "{cid}"\nclient_secret = "s-{cid}"\n'
        'card_template_id = "tpl"\n'
    )
    (folder / "first.toml").write_text(body.format(cid="dingsameapp"))
    (folder / "second.toml").write_text(body.format(cid="dingsameapp"))
    (folder / "other.toml").write_text(body.format(cid="dingotherapp"))
    with pytest.raises(ConfigError) as info:
        load_instances(folder, REGISTRY, env={})
    [problem] = info.value.problems
    assert problem.file.endswith("second.toml")
    assert "first.toml" in problem.message and "same dingtalk-stream app" in problem.message

    # Disabling one of them is the fix.
    (folder / "second.toml").write_text("enabled = false\n" + body.format(cid="dingsameapp"))
    assert len(load_instances(folder, REGISTRY, env={})) == 3


# -- 18. long answers ------------------------------------------------------------------------------


async def test_a_long_answer_continues_in_further_cards_without_losing_text(
    start: Start, emu: DingTalkEmulator
) -> None:
    async with asyncio.timeout(15):
        await start(settings={"card_max_length": 100})
        text = " ".join(f"word{i:03d}" for i in range(40))  # 319 characters
        sent = await ask(emu, text)
        await ended_card(emu, sent)

        def parts() -> list[CardState]:
            found = []
            while (card := emu.cards.get(track(sent, len(found)))) is not None:
                found.append(card)
            return found

        await emu.wait_until(
            lambda: parts()[-1].ended and parts()[-1].param_map.get("feedback") == "1", 10
        )
        cards = parts()
        assert len(cards) >= 4
        assert cards[1].out_track_id == f"{track(sent)}.1"
        assert all(card.status == "finished" for card in cards)
        assert all(len(card.content["content"]) <= 100 for card in cards)
        assert "".join(card.content["content"] for card in cards) == text
        assert [card.param_map["feedback"] for card in cards] == ["0"] * (len(cards) - 1) + ["1"]
        assert all(len(creates(emu, card.out_track_id)) == 1 for card in cards)
        assert emu.violations == []
