"""ReplyStream: single-flight, latest-wins, paced, split, and a final state that always lands."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from gateway.driver import Capabilities
from gateway.logs import instance_logger
from gateway.pacing import PacingPolicy, ReplyStream
from gateway_testkit.channels import RecordingChannel

EDITS = Capabilities(edits=True, feedback=True)


def make(channel: RecordingChannel, *, caps: Capabilities = EDITS, **policy: float) -> ReplyStream:
    stream = ReplyStream(
        channel,
        policy=PacingPolicy(**policy),  # type: ignore[arg-type]
        capabilities=caps,
        feedback=True,
        logger=instance_logger("t"),
        message_id="m1",
    )
    stream.open()
    return stream


async def test_placeholder_updates_and_final_in_order() -> None:
    channel = RecordingChannel()
    stream = make(channel, interval=0.01)
    for text in ("a", "ab", "abc"):
        stream.push(text)
        await asyncio.sleep(0.03)
    await stream.finish("abcd")
    methods = [entry[1] for entry in channel.log]
    assert methods[0] == "start"
    assert methods[-1] == "finish"
    assert channel.log[-1] == (0, "finish", "abcd", True)
    assert [e[2] for e in channel.calls("update")] == ["a", "ab", "abc"]


async def test_single_flight_and_latest_wins_on_a_slow_platform() -> None:
    channel = RecordingChannel(delay=0.05)
    stream = make(channel, interval=0.0)
    text = ""
    for i in range(200):
        text += f"{i} "
        stream.push(text)
        await asyncio.sleep(0.001)
    await stream.finish(text)
    assert channel.max_in_flight == 1
    updates = [e[2] for e in channel.calls("update")]
    assert len(updates) < 50  # ~0.2 s of pushes over 0.05 s calls: far fewer than 200
    # Every update shows a newer text than the one before (nothing stale sent after fresh).
    assert all(len(a) < len(b) for a, b in itertools.pairwise(updates))
    assert channel.log[-1] == (0, "finish", text, True)


async def test_updates_are_spaced_by_the_interval() -> None:
    channel = RecordingChannel()
    stream = make(channel, interval=0.05)
    text = ""
    for _ in range(40):
        text += "x"
        stream.push(text)
        await asyncio.sleep(0.005)
    await stream.finish(text)
    gaps = [b - a for a, b in itertools.pairwise(channel.times)]
    assert gaps and min(gaps) >= 0.049


async def test_update_cap_keeps_the_last_for_the_final_text() -> None:
    channel = RecordingChannel()
    stream = make(channel, interval=0.0, max_updates=3)
    for i in range(1, 30):
        stream.push("x" * i)
        await asyncio.sleep(0.002)
    await stream.finish("x" * 30)
    assert len(channel.calls("update")) == 2
    assert channel.log[-1] == (0, "finish", "x" * 30, True)


async def test_a_quick_answer_replaces_the_placeholder_without_waiting_an_interval() -> None:
    channel = RecordingChannel()
    stream = make(channel, interval=30.0)
    stream.push("quick")
    # Only the wait for the first update would take 30 s; the final text is not held back by it.
    await asyncio.wait_for(stream.finish("quick answer"), 5)
    assert [entry[1] for entry in channel.log] == ["start", "finish"]
    assert channel.log[-1] == (0, "finish", "quick answer", True)


async def test_after_an_update_the_final_edit_waits_for_the_interval() -> None:
    channel = RecordingChannel()
    stream = make(channel, interval=30.0, every_chunks=1)
    stream.push("first")
    await asyncio.sleep(0.05)
    assert len(channel.calls("update")) == 1
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(stream.finish("final")), 0.3)
    assert [entry[1] for entry in channel.log] == ["start", "update"]


async def test_chunk_trigger_updates_before_the_interval() -> None:
    channel = RecordingChannel()
    stream = make(channel, interval=30.0, every_chunks=2)
    for i in range(1, 7):
        stream.push("y" * i)
        await asyncio.sleep(0.01)
    assert len(channel.calls("update")) >= 2
    stream_task = asyncio.create_task(stream.finish("done"))
    # The final edit still respects the interval (platforms limit edits per message), so don't wait.
    stream_task.cancel()


async def test_long_answers_continue_in_follow_up_parts_without_losing_text() -> None:
    channel = RecordingChannel()
    stream = make(channel, caps=Capabilities(edits=True, feedback=True, max_text_length=40))
    words = " ".join(f"word{i}" for i in range(60))
    for end in range(0, len(words) + 1, 7):
        stream.push(words[:end])
        await asyncio.sleep(0)
    await stream.finish(words)
    finished = channel.calls("finish")
    assert len(finished) >= 8
    assert all(len(entry[2]) <= 40 for entry in channel.log if entry[1] in ("update", "finish"))
    assert "".join(entry[2] for entry in finished) == words
    assert [entry[0] for entry in finished] == list(range(len(finished)))
    assert [entry[3] for entry in finished] == [False] * (len(finished) - 1) + [True]


async def test_platforms_without_edits_get_only_final_parts() -> None:
    channel = RecordingChannel()
    stream = make(channel, caps=Capabilities(edits=False, max_text_length=20))
    stream.push("partial")
    await stream.finish("0123456789 " * 5)
    assert {entry[1] for entry in channel.log} == {"finish"}
    assert "".join(entry[2] for entry in channel.log) == "0123456789 " * 5
    # Feedback was asked for, but the platform has none: never attached.
    assert all(entry[3] is False for entry in channel.log)


async def test_failure_shows_what_was_answered_and_the_error() -> None:
    channel = RecordingChannel()
    stream = make(channel, interval=0.0)
    stream.push("half an")
    await asyncio.sleep(0.01)
    await stream.fail("half an", "The agent timed out.")
    assert channel.log[-1] == (0, "fail", "half an", "The agent timed out.")


async def test_a_failing_update_is_superseded_and_a_failing_final_falls_back_to_fail() -> None:
    channel = RecordingChannel(fail_on=frozenset({"update", "finish"}))
    stream = make(channel, interval=0.0)
    stream.push("one")
    await asyncio.sleep(0.01)
    stream.push("one two")
    await asyncio.sleep(0.01)
    await stream.finish("one two three")
    assert channel.log[-1][1:] == (
        "fail",
        "one two three",
        "The answer could not be shown completely.",
    )


async def test_final_state_lands_even_if_the_caller_is_cancelled() -> None:
    channel = RecordingChannel(delay=0.05)
    stream = make(channel, interval=0.0)
    caller = asyncio.create_task(stream.fail("text", "interrupted"))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.wait_for(channel.done.wait(), 1)
    assert channel.log[-1] == (0, "fail", "text", "interrupted")
