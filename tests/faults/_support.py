"""Waiting and judging helpers of the fault-injection suite, written against ``FaultInjection``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable

from gateway.runtime import InstanceRuntime
from gateway_testkit.harness import FaultInjection, ReplyRecord, ReplyView

__all__ = [
    "ONCE",
    "Start",
    "all_streaming",
    "assert_answered_once",
    "send_all",
    "wait_all_ended",
    "wait_connected",
]

Start = Callable[..., Awaitable[InstanceRuntime]]

#: one reply, finished: what the user must see for every short message
ONCE = ReplyRecord(replies=1, unfinished=0)


async def send_all(harness: FaultInjection, texts: dict[str, str], sender: str = "user") -> None:
    """Send every message of ``texts`` (id -> text) at once, each from its own user (``sender``
    followed by its index); return once all are acknowledged."""
    await asyncio.gather(
        *(
            harness.send(text, sender=f"{sender}{i}", message_id=message_id)
            for i, (message_id, text) in enumerate(texts.items())
        )
    )


async def all_streaming(harness: FaultInjection, message_ids: Iterable[str]) -> None:
    """Wait until every reply of ``message_ids`` is streaming at the same time."""
    while not all([(await harness.reply(m)).state == "streaming" for m in message_ids]):
        await asyncio.sleep(0.02)


async def wait_connected(harness: FaultInjection, timeout: float = 10.0) -> float:
    """Seconds until the platform holds a live connection of the gateway again."""
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        while harness.connections() < 1:
            await asyncio.sleep(0.01)
    return time.monotonic() - started


async def wait_all_ended(
    harness: FaultInjection, message_ids: Iterable[str], timeout: float
) -> dict[str, ReplyView]:
    """Every reply once it has ended (final or failed); fails naming the ones that did not."""
    views: dict[str, ReplyView] = {}
    pending = list(message_ids)
    try:
        async with asyncio.timeout(timeout):
            while pending:
                for message_id in list(pending):
                    view = await harness.reply(message_id)
                    if view.ended:
                        views[message_id] = view
                        pending.remove(message_id)
                if pending:
                    await asyncio.sleep(0.05)
    except TimeoutError:
        shown = {m: await harness.reply(m) for m in pending[:5]}
        raise AssertionError(
            f"{len(pending)} repl(ies) not ended within {timeout} s, e.g. {shown}"
        ) from None
    return views


async def assert_answered_once(
    harness: FaultInjection, texts: dict[str, str], timeout: float = 20.0
) -> None:
    """Every message of ``texts`` (id -> the text the echo agent repeats) got exactly one final
    reply with that text, and nothing is left unfinished: judged by the platform's record, after
    a moment for a late duplicate to show."""
    views = await wait_all_ended(harness, texts, timeout)
    await asyncio.sleep(0.3)
    wrong = {
        m: (views[m].state, views[m].text)
        for m, text in texts.items()
        if (views[m].state, views[m].text) != ("final", text)
    }
    assert not wrong, f"{len(wrong)} wrong answer(s), e.g. {list(wrong.items())[:3]}"
    records = {m: harness.reply_record(m) for m in texts}
    twice = {m: r for m, r in records.items() if r != ONCE}
    assert not twice, f"{len(twice)} message(s) not answered exactly once: {twice}"
