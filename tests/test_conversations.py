"""Conversations through the real core: busy policies, history, built-in commands, access control."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.agent import HistoryTurn
from gateway.config import InstanceConfig, ProcessSettings, load_instance
from gateway.models import Outcome
from gateway.plugins import PluginRegistry
from gateway.runtime import Gateway, InstanceRuntime
from gateway.store import InboxEntry
from gateway.supervisor import InstanceState
from gateway_testkit.agents import ScriptedAgent
from gateway_testkit.memory import MemoryDriver

REGISTRY = PluginRegistry.from_classes(
    drivers={"memory": MemoryDriver}, agents={"scripted": ScriptedAgent}
)
FAST = {"sleep": lambda _delay: asyncio.sleep(0)}
ECHO = 'type = "scripted"\necho = true'
SLOW_ECHO = 'type = "scripted"\necho = true\ndelay = 0.3'
HANG = 'type = "scripted"\nchunks = ["partial"]\nthen = "hang"'


def process(tmp_path: Path) -> ProcessSettings:
    return ProcessSettings(state_dir=str(tmp_path / "state"), shutdown_grace=1.0)


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    gw = await Gateway.open(process(tmp_path))
    yield gw
    await gw.close(grace=0.5)


@pytest.fixture
def configure(tmp_path: Path) -> Callable[..., InstanceConfig]:
    def make(*, agent: str = ECHO, conversation: str = "", access: str = "") -> InstanceConfig:
        path = tmp_path / "bot.toml"
        path.write_text(
            f'type = "memory"\n[agent]\n{agent}\n[reply]\nupdate_interval = 0.0\n'
            f"[conversation]\nidle_timeout = 30\n{conversation}\n[access]\n{access}\n"
        )
        return load_instance(path, REGISTRY, env={})

    return make


async def start(gateway: Gateway, config: InstanceConfig) -> tuple[InstanceRuntime, MemoryDriver]:
    runtime = gateway.start(config, supervisor_options=FAST)
    assert runtime is not None
    assert isinstance(runtime.driver, MemoryDriver)
    async with asyncio.timeout(10):
        while runtime.status.state is not InstanceState.CONNECTED:
            await asyncio.sleep(0.005)
    return runtime, runtime.driver


def agent_of(runtime: InstanceRuntime) -> ScriptedAgent:
    assert isinstance(runtime.agent, ScriptedAgent)
    return runtime.agent


async def requests_reach(runtime: InstanceRuntime, count: int) -> None:
    async with asyncio.timeout(10):
        while len(agent_of(runtime).requests) < count:
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.02)  # let the turn get into the agent's stream


async def settled(gateway: Gateway, message_id: str) -> InboxEntry:
    async with asyncio.timeout(10):
        while True:
            entry = await gateway.inbox.entry("bot", message_id)
            if entry is not None and entry.done:
                return entry
            await asyncio.sleep(0.005)


async def all_settled(gateway: Gateway, driver: MemoryDriver, ids: list[str]) -> list[InboxEntry]:
    """Every message is done in the inbox and no reply is left "thinking"."""
    entries = [await settled(gateway, mid) for mid in ids]
    for mid in ids:
        await driver.wait_done(mid)
    assert await gateway.inbox.pending("bot") == []
    return entries


def final(driver: MemoryDriver, message_id: str) -> tuple[object, ...]:
    return driver.replies[message_id].log[-1][1:]


# -- busy policies ----------------------------------------------------------------------------


async def test_queue_answers_every_message_in_order(gateway, configure) -> None:
    runtime, driver = await start(gateway, configure(agent=SLOW_ECHO.replace("0.3", "0.05")))
    ids = [f"q{i}" for i in range(5)]
    await asyncio.gather(*(driver.inject(f"question {mid}", message_id=mid) for mid in ids))
    entries = await all_settled(gateway, driver, ids)
    assert driver.finished == ids
    assert [e.answer for e in entries] == [f"question {mid}" for mid in ids]
    assert all(e.outcome is Outcome.ANSWERED for e in entries)
    assert runtime.status.in_flight == 0


async def test_collect_merges_messages_arriving_while_busy_into_one_turn(
    gateway, configure
) -> None:
    runtime, driver = await start(
        gateway, configure(agent=SLOW_ECHO, conversation='busy = "collect"')
    )
    await driver.inject("first", message_id="c1")
    await requests_reach(runtime, 1)
    for i in (2, 3, 4):
        await driver.inject(f"more {i}", message_id=f"c{i}")
    entries = await all_settled(gateway, driver, ["c1", "c2", "c3", "c4"])
    texts = [r.text for r in agent_of(runtime).requests]
    assert texts == ["first", "more 2\n\nmore 3\n\nmore 4"]
    assert final(driver, "c1") == ("finish", "first", True)
    assert final(driver, "c4") == ("finish", "more 2\n\nmore 3\n\nmore 4", True)
    for mid in ("c2", "c3"):
        kind, note = final(driver, mid)[:2]
        assert kind == "finish" and "later message" in str(note)
    assert all(e.outcome is Outcome.ANSWERED for e in entries)
    assert runtime.status.in_flight == 0


async def test_drop_answers_busy_messages_at_once_without_the_agent(gateway, configure) -> None:
    config = configure(agent=SLOW_ECHO, conversation='busy = "drop"\nbusy_reply = "Busy, sorry."')
    runtime, driver = await start(gateway, config)
    await driver.inject("slow one", message_id="d1")
    await requests_reach(runtime, 1)
    await driver.inject("impatient", message_id="d2")
    await driver.inject("very impatient", message_id="d3")
    assert final(driver, "d2")[:2] == ("finish", "Busy, sorry.")
    assert not driver.replies["d1"].done.is_set()  # dropped ones answered while d1 still runs
    entries = await all_settled(gateway, driver, ["d1", "d2", "d3"])
    assert final(driver, "d1") == ("finish", "slow one", True)
    assert [e.answer for e in entries] == ["slow one", "Busy, sorry.", "Busy, sorry."]
    assert len(agent_of(runtime).requests) == 1
    # Not busy any more: answered by the agent again.
    await driver.inject("now", message_id="d4")
    await driver.wait_done("d4")
    assert final(driver, "d4") == ("finish", "now", True)


async def test_interrupt_cancels_the_running_turn_and_answers_the_newest(
    gateway, configure
) -> None:
    runtime, driver = await start(
        gateway, configure(agent=SLOW_ECHO, conversation='busy = "interrupt"')
    )
    await driver.inject("old question", message_id="i1")
    await requests_reach(runtime, 1)
    await asyncio.gather(*(driver.inject(f"new {i}", message_id=f"i{i}") for i in (2, 3, 4)))
    entries = await all_settled(gateway, driver, ["i1", "i2", "i3", "i4"])
    for mid in ("i1", "i2", "i3"):
        kind, _text, error = final(driver, mid)
        assert kind == "fail" and "newer message" in str(error)
    assert final(driver, "i4") == ("finish", "new 4", True)
    assert [e.outcome for e in entries] == [Outcome.INTERRUPTED] * 3 + [Outcome.ANSWERED]
    assert agent_of(runtime).requests[-1].text == "new 4"
    assert runtime.status.in_flight == 0


async def test_busy_policies_are_per_session(gateway, configure) -> None:
    runtime, driver = await start(gateway, configure(agent=SLOW_ECHO, conversation='busy = "drop"'))
    await driver.inject("alice asks", sender="alice", message_id="a1")
    await requests_reach(runtime, 1)
    await driver.inject("bob asks", sender="bob", message_id="b1")
    await all_settled(gateway, driver, ["a1", "b1"])
    assert final(driver, "b1") == ("finish", "bob asks", True)


# -- history ----------------------------------------------------------------------------------


async def test_history_is_passed_to_the_agent_oldest_first(gateway, configure) -> None:
    runtime, driver = await start(gateway, configure())
    for i in range(3):
        await driver.inject(f"q{i}", message_id=f"h{i}")
        await settled(gateway, f"h{i}")
    # Another session has its own history.
    await driver.inject("other", sender="u2", message_id="o1")
    await settled(gateway, "o1")
    requests = agent_of(runtime).requests
    assert requests[0].history == ()
    assert requests[2].history == (HistoryTurn("q0", "q0"), HistoryTurn("q1", "q1"))
    assert requests[3].history == ()


async def test_history_limits_by_turns_and_characters(gateway, configure) -> None:
    runtime, driver = await start(
        gateway, configure(conversation="history_turns = 2\nhistory_chars = 1000")
    )
    for i in range(4):
        await driver.inject(f"q{i}", message_id=f"t{i}")
        await settled(gateway, f"t{i}")
    assert agent_of(runtime).requests[-1].history == (
        HistoryTurn("q1", "q1"),
        HistoryTurn("q2", "q2"),
    )
    await gateway.stop("bot")
    # 20 characters: the newest turn (8 + 8) fits, the one before does not.
    runtime, driver = await start(gateway, configure(conversation="history_chars = 20"))
    for i in range(2):
        await driver.inject(f"long-{i}x", message_id=f"l{i}")
        await settled(gateway, f"l{i}")
    await driver.inject("last", message_id="l2")
    await settled(gateway, "l2")
    assert agent_of(runtime).requests[-1].history == (HistoryTurn("long-1x", "long-1x"),)


async def test_history_older_than_the_maximum_age_is_ignored_and_pruned(gateway, configure) -> None:
    runtime, driver = await start(gateway, configure(conversation="history_max_age = 100"))
    await gateway.history.append("bot", "s:u1", "ancient", "answer", at=time.time() - 1000)
    await gateway.history.append("bot", "s:u1", "recent", "answer")
    await driver.inject("now", message_id="a1")
    await settled(gateway, "a1")
    assert agent_of(runtime).requests[-1].history == (HistoryTurn("recent", "answer"),)
    assert await gateway.history.prune({"bot": 100}) == 1
    assert await gateway.history.count("bot") == 2


async def test_failed_and_interrupted_turns_are_not_remembered(gateway, configure) -> None:
    runtime, driver = await start(
        gateway, configure(agent='type = "scripted"\necho = true\nthen = "agent"')
    )
    await driver.inject("fails", message_id="f1")
    assert (await settled(gateway, "f1")).outcome is Outcome.FAILED
    await gateway.stop("bot")
    runtime, driver = await start(gateway, configure(agent=HANG))
    await driver.inject("hangs", message_id="f2")
    await requests_reach(runtime, 1)
    await driver.inject("/stop", message_id="f3")
    assert (await settled(gateway, "f2")).outcome is Outcome.INTERRUPTED
    assert await gateway.history.count("bot") == 0


async def test_history_survives_a_restart(tmp_path, configure) -> None:
    gw = await Gateway.open(process(tmp_path))
    try:
        _, driver = await start(gw, configure())
        await driver.inject("remember me", message_id="r1")
        await settled(gw, "r1")
    finally:
        await gw.close(grace=0.5)
    gw = await Gateway.open(process(tmp_path))
    try:
        runtime, driver = await start(gw, configure())
        await driver.inject("do you?", message_id="r2")
        await settled(gw, "r2")
        assert agent_of(runtime).requests[-1].history == (
            HistoryTurn("remember me", "remember me"),
        )
    finally:
        await gw.close(grace=0.5)


# -- commands ---------------------------------------------------------------------------------


async def test_reset_clears_the_sessions_history(gateway, configure) -> None:
    runtime, driver = await start(gateway, configure())
    await driver.inject("q1", message_id="x1")
    await settled(gateway, "x1")
    await driver.inject("q1", sender="u2", message_id="y1")
    await settled(gateway, "y1")
    await driver.inject("/Reset please", message_id="x2")
    assert (await settled(gateway, "x2")).answer == "History cleared."
    assert final(driver, "x2") == ("finish", "History cleared.", False)
    assert await gateway.history.count("bot", "s:u1") == 0
    assert await gateway.history.count("bot", "s:u2") == 1
    await driver.inject("q2", message_id="x3")
    await settled(gateway, "x3")
    assert agent_of(runtime).requests[-1].history == ()
    assert [r.text for r in agent_of(runtime).requests] == ["q1", "q1", "q2"]


async def test_help_answers_the_help_text(gateway, configure) -> None:
    runtime, driver = await start(gateway, configure(conversation='help_text = "Ask me."'))
    await driver.inject("  /HELP", message_id="h1")
    await driver.wait_done("h1")
    assert final(driver, "h1") == ("finish", "Ask me.", False)
    assert agent_of(runtime).requests == []


async def test_stop_cancels_the_running_turn_even_under_queue(gateway, configure) -> None:
    runtime, driver = await start(gateway, configure(agent=HANG))
    await driver.inject("/stop", message_id="s0")
    assert (await settled(gateway, "s0")).answer == "Nothing to stop."
    await driver.inject("long one", message_id="s1")
    await driver.inject("queued", message_id="s2")
    await requests_reach(runtime, 1)
    await driver.inject("/stop", message_id="s3")
    assert (await settled(gateway, "s3")).answer == "Stopped."
    await driver.wait_done("s1")
    assert final(driver, "s1") == ("fail", "partial", "The answer was stopped.")
    assert (await settled(gateway, "s1")).outcome is Outcome.INTERRUPTED
    # The queued message is answered next; stop it too.
    await requests_reach(runtime, 2)
    assert agent_of(runtime).requests[1].text == "queued"
    await driver.inject("/stop", message_id="s4")
    await all_settled(gateway, driver, ["s0", "s1", "s2", "s3", "s4"])
    assert runtime.status.in_flight == 0


async def test_unknown_commands_and_a_disabled_prefix_go_to_the_agent(gateway, configure) -> None:
    _, driver = await start(gateway, configure())
    await driver.inject("/weather tomorrow", message_id="u1")
    await driver.wait_done("u1")
    assert final(driver, "u1") == ("finish", "/weather tomorrow", True)
    await gateway.stop("bot")
    _, driver = await start(gateway, configure(conversation='command_prefix = ""'))
    await driver.inject("/help", message_id="u2")
    await driver.wait_done("u2")
    assert final(driver, "u2") == ("finish", "/help", True)


async def test_commands_bypass_the_busy_policy(gateway, configure) -> None:
    runtime, driver = await start(gateway, configure(agent=HANG, conversation='busy = "drop"'))
    await driver.inject("long one", message_id="b1")
    await requests_reach(runtime, 1)
    await driver.inject("/help", message_id="b2")
    await driver.inject("/stop", message_id="b3")
    entries = await all_settled(gateway, driver, ["b1", "b2", "b3"])
    assert entries[1].answer == runtime.config.conversation.help_text
    assert entries[2].answer == "Stopped."


# -- access control ---------------------------------------------------------------------------


async def test_a_denied_message_gets_the_reason_and_no_agent_call(gateway, configure) -> None:
    config = configure(access='users_deny = ["mallory"]\ndenied_reply = "Go away."')
    runtime, driver = await start(gateway, config)
    await driver.inject("hello", sender="mallory", message_id="n1")
    await driver.inject("/help", sender="mallory", message_id="n2")
    entries = await all_settled(gateway, driver, ["n1", "n2"])
    assert final(driver, "n1") == ("fail", "", "Go away.")
    assert [e.outcome for e in entries] == [Outcome.DENIED, Outcome.DENIED]
    assert runtime.status.denied == 2
    assert agent_of(runtime).requests == []


async def test_a_silent_refusal_shows_nothing_at_all(gateway, configure) -> None:
    config = configure(access='users_deny = ["mallory"]\ndenied_reply = ""')
    runtime, driver = await start(gateway, config)
    await driver.inject("hello", sender="mallory", message_id="n1")
    entry = await settled(gateway, "n1")
    assert entry.outcome is Outcome.DENIED
    await asyncio.sleep(0.05)
    assert "n1" not in driver.replies
    assert runtime.status.denied == 1
    assert runtime.status.in_flight == 0


async def test_the_agent_gets_the_truncated_message(gateway, configure) -> None:
    runtime, driver = await start(gateway, configure(access="max_input_chars = 5"))
    await driver.inject("hello world", message_id="t1")
    entry = await settled(gateway, "t1")
    text = agent_of(runtime).requests[0].text
    assert text.startswith("hello\n") and "world" not in text
    assert entry.message.text == "hello world"  # the inbox keeps what was received
