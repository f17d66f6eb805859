"""Agent faults: exceptions, silence past the idle timeout, answers past the total timeout, errors
mid-stream, non-text output.  Each ends in a readable failed reply; the healthy conversations
answered meanwhile are not held up, and the failed ones answer their next message."""

from __future__ import annotations

import asyncio

from gateway_testkit.harness import FaultInjection

from . import _agents
from ._support import ONCE, Start, assert_answered_once, wait_all_ended

#: question -> what the failed reply must say (the core's and the python agent's own texts)
FAULTS = {
    "raise now": "The agent failed while answering.",
    "midway please": "The agent failed while answering.",
    "silent please": "The agent sent nothing for 0.8 s and was stopped.",
    "endless please": "The agent did not finish within 3 s.",
    "nontext please": "The agent produced something that is not text.",
}
#: the partial answer each failed reply keeps before the reason
PARTIAL = {
    "midway please": "partial answer",
    "silent please": "let me think",
    "nontext please": "this is",
}


async def test_each_agent_fault_ends_in_a_readable_failed_reply_and_others_go_on(
    start: Start, harness: FaultInjection
) -> None:
    agent = {"type": "python", "callable": f"{_agents.__name__}:faulty"}
    async with asyncio.timeout(40):
        await start(agent, conversation={"timeout": 3.0, "idle_timeout": 0.8})
        failing = {
            await harness.send(q, sender=f"faulty{i}", message_id=f"fault-{i}"): q
            for i, q in enumerate(FAULTS)
        }
        healthy = {f"healthy-{i}": f"a healthy conversation number {i}" for i in range(4)}
        for i, (message_id, text) in enumerate(healthy.items()):
            await harness.send(text, sender=f"healthy{i}", message_id=message_id)

        # Healthy answers end while the timeouts of the others still run: nobody waits for them.
        await wait_all_ended(harness, healthy, timeout=10)
        hung = [m for m, q in failing.items() if q.startswith("endless")]
        assert not (await harness.reply(hung[0])).ended, "the endless answer ended too early"
        await assert_answered_once(harness, healthy)

        views = await wait_all_ended(harness, failing, timeout=15)
        for message_id, question in failing.items():
            view = views[message_id]
            assert view.state == "failed", (question, view)
            assert FAULTS[question] in view.error, (question, view.error)
            assert "Traceback" not in view.error and "exploded" not in view.error, view.error
            if question in PARTIAL:
                assert view.text.startswith(PARTIAL[question]), (question, view.text)
            assert harness.reply_record(message_id) == ONCE, question

        # The failed conversations are free again: their next message is answered.
        again = {f"again-{i}": f"fine now {i}" for i in range(len(FAULTS))}
        for i, (message_id, text) in enumerate(again.items()):
            await harness.send(text, sender=f"faulty{i}", message_id=message_id)
        await assert_answered_once(harness, again)
