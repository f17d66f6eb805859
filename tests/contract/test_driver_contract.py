"""The driver contract: what every driver must do, checked from the platform's side.

Each test runs the real core (``Gateway``) with a driver found through its entry point, and judges
only by what the platform shows (the harness) and what the core recorded.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import InstanceConfig, ProcessSettings, load_instance
from gateway.plugins import PluginRegistry
from gateway.runtime import Gateway, InstanceRuntime
from gateway.supervisor import InstanceState
from gateway_testkit.harness import PlatformHarness

REGISTRY = PluginRegistry.discover()
Start = Callable[..., Awaitable[InstanceRuntime]]


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    gw = await Gateway.open(ProcessSettings(state_dir=str(tmp_path / "state"), shutdown_grace=2.0))
    yield gw
    await gw.close(grace=0.5)


def instance_config(
    tmp_path: Path, harness: PlatformHarness, agent: dict[str, Any], name: str = "bot"
) -> InstanceConfig:
    data = {
        "type": harness.driver_type,
        "settings": harness.settings(),
        "agent": agent,
        "reply": {"update_interval": 0.05},
        "reconnect": {"initial_delay": 0.05, "max_delay": 0.2},
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return load_instance(path, REGISTRY, env={})


@pytest.fixture
def start(gateway: Gateway, harness: PlatformHarness, tmp_path: Path) -> Start:
    async def start(agent: dict[str, Any] | None = None) -> InstanceRuntime:
        config = instance_config(tmp_path, harness, agent or {"type": "echo", "delay": 0})
        runtime = gateway.start(config)
        assert runtime is not None
        async with asyncio.timeout(10):
            while runtime.status.state is not InstanceState.CONNECTED:
                await asyncio.sleep(0.01)
        return runtime

    return start


async def test_connects_and_reports_it(start: Start) -> None:
    runtime = await start()
    assert runtime.status.connected_since is not None


async def test_answers_a_message(start: Start, harness: PlatformHarness) -> None:
    await start()
    message_id = await harness.send("hello from the platform")
    view = await harness.wait_reply(message_id)
    assert (view.state, view.text) == ("final", "hello from the platform")


async def test_streams_intermediate_states_when_the_platform_can_edit(
    start: Start, harness: PlatformHarness
) -> None:
    runtime = await start({"type": "echo", "delay": 0.05})
    assert runtime.driver.capabilities.edits, "every driver so far edits; adapt the test otherwise"
    message_id = await harness.send("one two three four five six seven eight")
    view = await harness.wait_reply(message_id)
    assert view.state == "final"
    assert view.updates >= 2


async def test_a_redelivered_message_is_answered_once(
    start: Start, harness: PlatformHarness, gateway: Gateway
) -> None:
    await start({"type": "echo", "delay": 0.02})
    message_id = await harness.send("answer me once")
    await harness.redeliver(message_id)  # while the first answer runs
    first = await harness.wait_reply(message_id)
    await harness.redeliver(message_id)  # after it was answered
    await asyncio.sleep(0.2)
    assert await harness.reply(message_id) == first
    assert first.text == "answer me once"


async def test_long_answers_are_split_into_parts_without_losing_text(
    start: Start, harness: PlatformHarness
) -> None:
    await start()
    text = " ".join(f"word{i}" for i in range(harness.max_text_length // 2))
    message_id = await harness.send(text)
    view = await harness.wait_reply(message_id)
    assert view.state == "final"
    assert view.parts >= 2
    assert view.text == text


async def test_an_agent_failure_reaches_the_user(start: Start, harness: PlatformHarness) -> None:
    await start({"type": "scripted", "then": "agent"})
    message_id = await harness.send("fail please")
    view = await harness.wait_reply(message_id)
    assert view.state == "failed"
    assert "failed on purpose" in view.error


async def test_feedback_clicks_are_recorded(
    start: Start, harness: PlatformHarness, gateway: Gateway
) -> None:
    runtime = await start()
    if not runtime.driver.capabilities.feedback:
        pytest.fail("every driver so far has feedback buttons; adapt the test otherwise")
    message_id = await harness.send("rate me")
    await harness.wait_reply(message_id)
    await harness.click_feedback(message_id, "carol", "helpful")
    await harness.click_feedback(message_id, "carol", "unhelpful")
    async with asyncio.timeout(5):
        while not (rows := await gateway.feedback.rows("bot")) or rows[0].rating != "unhelpful":
            await asyncio.sleep(0.02)
    [row] = rows
    assert (row.user_id, row.question, row.answer) == (
        harness.user_id("carol"),
        "rate me",
        "rate me",
    )


async def test_a_message_stored_before_a_crash_is_answered_on_start(
    harness: PlatformHarness, gateway: Gateway, start: Start
) -> None:
    # What a crash leaves behind: an ACKed message in the inbox with no reply yet.  The driver must
    # be able to reply to it from the stored message alone.
    assert await gateway.inbox.add(harness.leftover("from-before", "resumed"))
    await start()
    view = await harness.wait_reply("from-before")
    assert (view.state, view.text) == ("final", "resumed")


async def test_stop_closes_the_driver_and_ends_serve(start: Start, gateway: Gateway) -> None:
    runtime = await start()
    # The contract asks close() to return within a second; the bound here only catches a hang.
    async with asyncio.timeout(5):
        await gateway.stop("bot", grace=0)
    assert runtime.status.state is InstanceState.STOPPED
    assert runtime._task is not None and runtime._task.done()
