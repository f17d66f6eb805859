"""The running core, in process: delivery, dedup, ordering, isolation, failures, shutdown, feedback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.agents.echo import EchoAgent
from gateway.config import InstanceConfig, ProcessSettings, load_instance
from gateway.errors import ShuttingDown
from gateway.models import FeedbackEvent, Outcome
from gateway.plugins import PluginRegistry
from gateway.runtime import Gateway, InstanceRuntime
from gateway.supervisor import InstanceState
from gateway_testkit.agents import ScriptedAgent
from gateway_testkit.memory import MemoryDriver

REGISTRY = PluginRegistry.from_classes(
    drivers={"memory": MemoryDriver}, agents={"scripted": ScriptedAgent, "echo": EchoAgent}
)
# Backoff delays are skipped; the 1 ms keeps a crash-looping instance from starving the others
# (and the database thread) in tests that run one on purpose.
FAST = {"sleep": lambda _delay: asyncio.sleep(0.001)}


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    gw = await Gateway.open(ProcessSettings(state_dir=str(tmp_path / "state"), shutdown_grace=1.0))
    yield gw
    await gw.close(grace=0.5)


@pytest.fixture
def configure(tmp_path: Path) -> Callable[..., InstanceConfig]:
    def make(
        name: str = "bot", *, agent: str = 'type = "echo"\ndelay = 0', extra: str = ""
    ) -> InstanceConfig:
        path = tmp_path / f"{name}.toml"
        path.write_text(
            f'type = "memory"\n{extra}\n[agent]\n{agent}\n[reply]\nupdate_interval = 0.0\n'
        )
        return load_instance(path, REGISTRY, env={})

    return make


def start(gateway: Gateway, config: InstanceConfig) -> tuple[InstanceRuntime, MemoryDriver]:
    runtime = gateway.start(config, supervisor_options=FAST)
    assert runtime is not None
    assert isinstance(runtime.driver, MemoryDriver)
    return runtime, runtime.driver


async def connected(runtime: InstanceRuntime) -> None:
    async with asyncio.timeout(10):
        while runtime.status.state is not InstanceState.CONNECTED:
            await asyncio.sleep(0.005)


async def settled(gateway: Gateway, message_id: str, instance: str = "bot"):
    """The inbox entry once the turn has recorded its outcome (just after the reply ended)."""
    async with asyncio.timeout(10):
        while True:
            entry = await gateway.inbox.entry(instance, message_id)
            if entry is not None and entry.outcome is not None:
                return entry
            await asyncio.sleep(0.005)


async def test_a_message_is_answered_with_placeholder_updates_and_final(gateway, configure) -> None:
    runtime, driver = start(gateway, configure())
    await connected(runtime)
    assert await driver.inject("hello streaming world", message_id="m1")
    channel = await driver.wait_done("m1")
    assert channel.log[0] == (0, "start")
    assert channel.log[-1] == (0, "finish", "hello streaming world", True)
    entry = await settled(gateway, "m1")
    assert entry.answer == "hello streaming world"
    assert entry.outcome == Outcome.ANSWERED


async def test_a_duplicate_delivery_is_not_answered_again(gateway, configure) -> None:
    runtime, driver = start(gateway, configure())
    await connected(runtime)
    assert await driver.inject("once", message_id="dup") is True
    await driver.wait_done("dup")
    assert await driver.inject("once", message_id="dup") is False
    await asyncio.sleep(0.05)
    assert len(driver.replies["dup"].calls("finish")) == 1
    assert driver.finished == ["dup"]


async def test_one_turn_at_a_time_per_session_in_delivery_order(gateway, configure) -> None:
    config = configure(agent='type = "scripted"\necho = true\ndelay = 0.01')
    runtime, driver = start(gateway, config)
    await connected(runtime)
    ids = [f"q{i}" for i in range(8)]
    for i, mid in enumerate(ids):
        await driver.inject(f"question {i}", sender="same", message_id=mid)
    for mid in ids:
        await driver.wait_done(mid)
    assert driver.finished == ids


async def test_sessions_run_in_parallel_up_to_the_concurrency_limit(gateway, configure) -> None:
    config = configure(
        agent='type = "scripted"\nthen = "hang"', extra="[conversation]\nconcurrency = 3"
    )
    runtime, driver = start(gateway, config)
    await connected(runtime)
    for i in range(5):
        await driver.inject("wait", sender=f"user{i}", message_id=f"p{i}")
    async with asyncio.timeout(10):
        while runtime._scheduler.running < 3:
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    assert runtime._scheduler.running == 3
    assert runtime.status.in_flight == 5


@pytest.mark.parametrize(
    ("then", "error"),
    [
        ("agent", "The scripted agent failed on purpose."),
        ("crash", "The agent failed while answering."),
        ("hang", "The agent sent nothing for 0.2 s and was stopped."),
    ],
)
async def test_agent_failures_become_readable_replies(gateway, configure, then, error) -> None:
    config = configure(
        agent=f'type = "scripted"\nthen = "{then}"',
        extra="[conversation]\nidle_timeout = 0.2",
    )
    runtime, driver = start(gateway, config)
    await connected(runtime)
    await driver.inject("go", message_id="f1")
    channel = await driver.wait_done("f1")
    assert channel.log[-1] == (0, "fail", "scripted answer", error)
    entry = await settled(gateway, "f1")
    assert entry.outcome == Outcome.FAILED
    # The instance keeps answering.
    await driver.inject("again", message_id="f2")
    await driver.wait_done("f2")


async def test_an_empty_message_gets_a_prompt_without_calling_the_agent(gateway, configure) -> None:
    config = configure(agent='type = "scripted"\nthen = "crash"')
    runtime, driver = start(gateway, config)
    await connected(runtime)
    await driver.inject("   ", message_id="bare")
    channel = await driver.wait_done("bare")
    assert channel.log[-1] == (0, "finish", "Please write your question after mentioning me.", True)


async def test_an_empty_answer_is_not_left_thinking(gateway, configure) -> None:
    runtime, driver = start(gateway, configure(agent='type = "scripted"\nchunks = []'))
    await connected(runtime)
    await driver.inject("anything", message_id="e1")
    channel = await driver.wait_done("e1")
    assert channel.log[-1] == (0, "fail", "", "The agent returned no answer.")


async def test_one_failing_instance_does_not_affect_another(gateway, configure) -> None:
    broken, _ = start(gateway, configure("broken", extra="[settings]\ncrash = true"))
    healthy, driver = start(gateway, configure("healthy"))
    await connected(healthy)
    async with asyncio.timeout(10):
        while broken.status.reconnects < 5:
            await asyncio.sleep(0.005)
    assert broken.status.last_error == "RuntimeError: driver bug"
    await driver.inject("still here?", message_id="h1")
    channel = await driver.wait_done("h1")
    assert channel.log[-1][1:] == ("finish", "still here?", True)


async def test_a_platform_down_at_start_is_retried_until_it_connects(gateway, configure) -> None:
    runtime, driver = start(gateway, configure(extra="[settings]\nfail_first = 4"))
    await connected(runtime)
    assert driver.serves == 5
    assert runtime.status.reconnects == 4


async def test_stop_finishes_in_time_or_interrupts_and_refuses_new_messages(
    gateway, configure
) -> None:
    config = configure(agent='type = "scripted"\nthen = "hang"')
    runtime, driver = start(gateway, config)
    await connected(runtime)
    await driver.inject("long question", message_id="s1")
    await asyncio.sleep(0.05)
    await gateway.stop("bot", grace=0.1)
    channel = driver.replies["s1"]
    assert channel.log[-1][1] == "fail"
    assert "interrupted" in str(channel.log[-1][3])
    assert driver.closed.is_set()
    assert runtime.status.state is InstanceState.STOPPED
    with pytest.raises(ShuttingDown):
        await driver.inject("too late", message_id="s2")
    entry = await settled(gateway, "s1")
    assert entry.outcome == Outcome.INTERRUPTED


async def test_restart_of_one_instance_leaves_the_other_alone(gateway, configure) -> None:
    a, driver_a = start(gateway, configure("a"))
    b, _ = start(gateway, configure("b"))
    await connected(a)
    await connected(b)
    await gateway.restart(configure("b"))
    assert gateway.instances["a"] is a and not driver_a.closed.is_set()
    assert gateway.instances["b"] is not b
    await connected(gateway.instances["b"])


async def test_feedback_is_stored_with_question_and_answer(gateway, configure) -> None:
    runtime, driver = start(gateway, configure())
    await connected(runtime)
    await driver.inject("what is up", message_id="fb1", sender="alice")
    await driver.wait_done("fb1")
    reply_id = (await settled(gateway, "fb1")).message.reply_id
    for rating in ("helpful", "unhelpful"):
        await runtime.feedback(
            FeedbackEvent.create(
                instance="bot", reply_id=reply_id, user_id="alice", rating=rating, message_id="fb1"
            )
        )
    [row] = await gateway.feedback.rows("bot")
    assert (row.rating, row.question, row.answer) == ("unhelpful", "what is up", "what is up")


async def test_long_answers_are_split_by_the_core(gateway, configure) -> None:
    text = " ".join(f"w{i}" for i in range(100))
    config = configure(extra="[settings]\nmax_text_length = 50")
    runtime, driver = start(gateway, config)
    await connected(runtime)
    await driver.inject(text, message_id="long")
    channel = await driver.wait_done("long")
    finished = channel.calls("finish")
    assert len(finished) > 1
    assert "".join(str(e[2]) for e in finished) == text


async def test_a_delivery_cancelled_midway_is_still_answered(gateway, configure) -> None:
    # A driver's frame task is cancelled when its connection drops; if the inbox already has the
    # message, it must be answered (its redelivery would be taken for a duplicate).
    runtime, driver = start(gateway, configure())
    await connected(runtime)
    delivering = asyncio.create_task(driver.inject("cancel me", message_id="c1"))
    await asyncio.sleep(0)
    delivering.cancel()
    with pytest.raises(asyncio.CancelledError):
        await delivering
    channel = await driver.wait_done("c1")
    assert channel.log[-1][1:] == ("finish", "cancel me", True)


async def test_a_message_stored_as_stop_begins_is_not_answered_after_the_driver_closed(
    gateway, configure
) -> None:
    # Its commit was under way when stop() began: it is acknowledged and taken in before the
    # driver closes (interrupted, or left pending with its placeholder for the next start to
    # continue), never answered through a closed driver.
    runtime, driver = start(gateway, configure(agent='type = "scripted"\nthen = "hang"'))
    await connected(runtime)
    opened_at_close: set[str] = set()
    close = driver.close

    async def recording_close() -> None:
        opened_at_close.update(driver.replies)
        await close()

    driver.close = recording_close  # type: ignore[method-assign]
    delivering = asyncio.create_task(driver.inject("just in time", message_id="late"))
    await asyncio.sleep(0)  # deliver() has handed the write to the store
    await gateway.stop("bot", grace=0)
    assert await delivering
    await asyncio.sleep(0.2)
    assert set(driver.replies) == opened_at_close
    entry = await gateway.inbox.entry("bot", "late")
    assert entry is not None
    assert entry.outcome in (None, Outcome.INTERRUPTED)
