"""The Feishu driver's pure parts: reading event payloads, putting multi-part frames together,
the card store and its sequence clock."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway_feishu._cardstore import CardRecord, CardStore, Sequence
from gateway_feishu._frames import DATA, Frame
from gateway_feishu._payload import (
    addressed_to_bot,
    feedback_from_feishu,
    incoming_from_feishu,
)
from gateway_feishu.driver import _MAX_PARTS, _MAX_PAYLOAD, _MAX_PENDING, _Parts

BOT = "ou_bot0000000000000000000000000000"
LOG = logging.LoggerAdapter(logging.getLogger("test.feishu.parts"), {})


def envelope(
    content: Any, *, message_type: str = "text", chat_type: str = "p2p", mentions: Any = None
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "message_id": "om_1",
        "chat_id": "oc_1",
        "chat_type": chat_type,
        "message_type": message_type,
        "create_time": "1700000000123",
        "content": json.dumps(content),
    }
    if mentions is not None:
        message["mentions"] = mentions
    return {
        "schema": "2.0",
        "header": {"event_type": "im.message.receive_v1", "event_id": "e1"},
        "event": {"sender": {"sender_id": {"open_id": "ou_alice"}}, "message": message},
    }


def mention(key: str, open_id: str, name: str) -> dict[str, Any]:
    return {"key": key, "id": {"open_id": open_id}, "name": name}


def test_a_group_message_is_for_the_bot_only_when_it_mentions_the_bot() -> None:
    others = [mention("@_user_1", "ou_carol", "Carol")]
    assert addressed_to_bot(envelope({"text": "hi"}), BOT)  # one-to-one: always
    assert not addressed_to_bot(envelope({"text": "hi"}, chat_type="group"), BOT)
    assert not addressed_to_bot(
        envelope({"text": "@_user_1 hi"}, chat_type="group", mentions=others), BOT
    )
    ours = [*others, mention("@_user_2", BOT, "Bot")]
    assert addressed_to_bot(
        envelope({"text": "@_user_2 hi"}, chat_type="group", mentions=ours), BOT
    )


def test_the_bots_mention_is_removed_and_others_read_as_names() -> None:
    mentions = [
        mention("@_user_1", BOT, "Bot"),
        mention("@_user_10", "ou_dave", "Dave"),
        mention("@_user_2", "ou_carol", "Carol"),
    ]
    payload = envelope(
        {"text": "@_user_1 ask @_user_2 and @_user_10 please"}, chat_type="group", mentions=mentions
    )
    message = incoming_from_feishu("bot", payload, BOT)
    assert message.text == "ask @Carol and @Dave please"
    assert (message.message_id, message.conversation_id, message.sender_id) == (
        "om_1",
        "oc_1",
        "ou_alice",
    )
    assert message.conversation_kind == "group"
    # The bot's own mention addressed the message; only the people it names are mentions.
    assert [m.user_id for m in message.mentions] == ["ou_dave", "ou_carol"]
    assert message.received_at == pytest.approx(1700000000.123)
    assert message.raw == payload


def test_rich_text_becomes_markdown_with_its_images_as_attachments() -> None:
    post = {
        "title": "Report",
        "content": [
            [
                {"tag": "text", "text": "see "},
                {"tag": "a", "text": "docs", "href": "https://x.test"},
            ],
            [
                {"tag": "at", "user_id": "@_user_1", "user_name": "Bot"},
                {"tag": "text", "text": " why"},
            ],
            [{"tag": "code_block", "language": "python", "text": "print(1)"}],
            [{"tag": "img", "image_key": "img_v2_abc"}],
        ],
    }
    message = incoming_from_feishu(
        "bot",
        envelope(post, message_type="post", mentions=[mention("@_user_1", BOT, "Bot")]),
        BOT,
    )
    assert message.text == "**Report**\nsee [docs](https://x.test)\nwhy\n\n```python\nprint(1)\n```"
    [image] = message.attachments
    assert (image.kind, image.url) == ("image", "img_v2_abc")
    # A post that went through the send API is wrapped in a locale.
    wrapped = incoming_from_feishu("bot", envelope({"zh_cn": post}, message_type="post"), BOT)
    assert wrapped.text.startswith("**Report**\nsee [docs]")


def test_files_are_attachments_and_other_types_arrive_empty() -> None:
    file = incoming_from_feishu(
        "bot", envelope({"file_key": "file_v3_1", "file_name": "a.pdf"}, message_type="file"), BOT
    )
    assert (file.text, [(a.kind, a.name, a.url) for a in file.attachments]) == (
        "",
        [("file", "a.pdf", "file_v3_1")],
    )
    sticker = incoming_from_feishu("bot", envelope({"file_key": "s"}, message_type="sticker"), BOT)
    assert (sticker.text, sticker.attachments) == ("", ())


@pytest.mark.parametrize(
    "broken",
    [
        {"schema": "2.0", "header": {}, "event": "nope"},
        {"schema": "2.0", "event": {"message": {"chat_id": "oc"}, "sender": {}}},
        envelope("a string, not an object"),
        {
            **envelope({"text": "x"}),
            "event": {"sender": {}, "message": {"message_id": " ", "chat_id": "oc"}},
        },
    ],
)
def test_unreadable_messages_raise_what_the_driver_acknowledges(broken: dict[str, Any]) -> None:
    with pytest.raises((KeyError, ValueError, TypeError)):
        incoming_from_feishu("bot", broken, BOT)


def test_feedback_clicks_are_read_from_the_button_value() -> None:
    def click(value: Any, operator: str = "ou_carol") -> dict[str, Any]:
        return {"event": {"operator": {"open_id": operator}, "action": {"value": value}}}

    event = feedback_from_feishu("bot", click({"reply_id": "r1", "rating": "helpful"}))
    assert event is not None
    assert (event.reply_id, event.user_id, event.rating) == ("r1", "ou_carol", "helpful")
    assert (
        feedback_from_feishu("bot", click(json.dumps({"reply_id": "r1", "rating": "x"})))
        is not None
    )
    assert feedback_from_feishu("bot", click({"action": "share"})) is None
    assert (
        feedback_from_feishu("bot", click({"reply_id": "r1", "rating": "x"}, operator="")) is None
    )


def part(message_id: str, index: int, total: int, payload: bytes) -> Frame:
    headers = {"type": "event", "message_id": message_id, "sum": str(total), "seq": str(index)}
    return Frame.build(DATA, headers, payload)


def test_multi_part_payloads_are_put_together_in_order() -> None:
    parts = _Parts(LOG)
    assert parts.add(part("f1", 2, 3, b"!")) is None
    assert parts.add(part("f2", 0, 1, b"single")) == b"single"
    assert parts.add(part("f1", 0, 3, b"hello ")) is None
    assert parts.add(part("f1", 1, 3, b"world")) == b"hello world!"
    assert parts.add(part("f1", 0, 3, b"again")) is None  # a new message with that id starts over
    assert parts.add(part("f3", 5, 2, b"?")) is None  # an index out of range is ignored
    assert parts.pending_bytes == len(b"again")


def test_hostile_part_counts_and_sizes_are_dropped_not_allocated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    parts = _Parts(LOG)
    with caplog.at_level(logging.WARNING):
        # sum=10**12 used to allocate [None] * 10**12 and kill the session with a MemoryError.
        assert parts.add(part("huge", 0, 10**12, b"x")) is None
        assert parts.add(part("many", 0, _MAX_PARTS + 1, b"x")) is None
        # Parts that add up to more than a payload may hold are dropped, and so is the payload.
        big = b"x" * (_MAX_PAYLOAD // 2 + 1)
        assert parts.add(part("big", 0, 3, big)) is None
        assert parts.add(part("big", 1, 3, big)) is None
        assert parts.pending_bytes == 0
        assert parts.add(part("big", 2, 3, b"!")) is None  # waits anew, until it expires
    assert parts.pending_bytes == 1
    assert caplog.text.count("dropping a part of payload") == 3
    # A well-formed payload still goes through afterwards.
    assert parts.add(part("ok", 1, 2, b"b")) is None
    assert parts.add(part("ok", 0, 2, b"a")) == b"ab"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["m1", "m2", "m3", ""]),
            st.one_of(
                st.integers(min_value=-5, max_value=10**15).map(str),
                st.sampled_from(["", "x", "1e9", " 3", "٣"]),
            ),
            st.one_of(
                st.integers(min_value=-5, max_value=100).map(str), st.sampled_from(["", "?"])
            ),
            st.integers(min_value=0, max_value=3 * 2**20),
        ),
        max_size=40,
    )
)
def test_any_sum_and_seq_headers_keep_the_parts_bounded(
    frames: list[tuple[str, str, str, int]],
) -> None:
    """Whatever the server claims in ``sum``/``seq``, nothing raises and memory stays bounded."""
    parts = _Parts(LOG)
    for message_id, total, index, size in frames:
        headers = {"type": "event", "message_id": message_id, "sum": total, "seq": index}
        payload = parts.add(Frame.build(DATA, headers, b"\0" * size))
        assert payload is None or len(payload) <= max(size, _MAX_PAYLOAD)
        assert 0 <= parts.pending_bytes <= _MAX_PENDING
        assert all(len(chunks) <= _MAX_PARTS for _, chunks in parts._pending.values())


def test_sequences_keep_increasing_across_a_restart() -> None:
    record = CardRecord.new("card1")
    first = Sequence(record.created)
    # CardKit takes 10 operations a second per card: a restart never comes within a burst's
    # length in milliseconds of its last operation.
    used = [first.next() for _ in range(10)]
    assert used == sorted(set(used))
    time.sleep(0.011)
    after_restart = Sequence(record.created)
    assert after_restart.next() > used[-1]


async def test_the_card_store_keeps_records_across_instances(tmp_path: Path) -> None:
    store = CardStore(tmp_path / "cards")
    assert await store.get("r.0") is None
    record = CardRecord.new("7001")
    await store.put("r.0", record)
    await store.put("r.0", CardRecord(record.card_id, record.created, "om_sent"))
    again = await CardStore(tmp_path / "cards").get("r.0")
    assert again == CardRecord("7001", record.created, "om_sent")
    (tmp_path / "cards" / "torn.0.json").write_text('{"card_id": ')
    assert await store.get("torn.0") is None
    assert sorted(p.name for p in (tmp_path / "cards").iterdir()) == ["r.0.json", "torn.0.json"]
