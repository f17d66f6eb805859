"""Abrupt socket drops every second or two during a burst of several hundred messages: every
message is answered exactly once, by the platform's record.  Reconnect times are measured."""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import pytest

from gateway_testkit.harness import FaultInjection

from ._support import Start, assert_answered_once, wait_connected

MESSAGES = 300
SENDERS = 60  # five messages each: sessions answer them in order, 60 at a time at most
RATE = 30.0  # messages per second: the burst lasts ten seconds, long enough for several drops


async def test_drops_during_a_burst_lose_and_duplicate_nothing(
    start: Start, harness: FaultInjection, record_property: pytest.RecordProperty
) -> None:
    # Frames pushed on a socket that died before the ACK come back quickly, as they would later.
    harness.redeliver_unacked_after(0.5)
    rng = random.Random(6)
    async with asyncio.timeout(90):
        # Answers stream for about half a second, so drops also hit replies in progress.
        runtime = await start(
            {"type": "echo", "delay": 0.05}, conversation={"concurrency": SENDERS}
        )
        texts = {
            f"drop-{i}": f"message {i} of the burst from user{i % SENDERS}" for i in range(MESSAGES)
        }

        async def produce() -> None:
            pushes = []
            for message_id, text in texts.items():
                sender = text.rsplit(" ", 1)[1]
                send = harness.send(text, sender=sender, message_id=message_id)
                pushes.append(asyncio.create_task(send))
                await asyncio.sleep(1 / RATE)
            await asyncio.gather(*pushes)

        burst = asyncio.create_task(produce())
        reconnects: list[float] = []
        while not burst.done():
            await asyncio.wait([burst], timeout=rng.uniform(1.0, 2.0))
            if burst.done():
                break
            dropped = time.monotonic()
            if await harness.drop_connections():
                await wait_connected(harness)
                reconnects.append(time.monotonic() - dropped)
        await burst
        await assert_answered_once(harness, texts, timeout=60)
        assert reconnects, "the burst ended before the first drop: the test proves nothing"
        assert runtime.status.reconnects >= len(reconnects)
    record_property("drops", len(reconnects))
    record_property("reconnect_s_median", round(statistics.median(reconnects), 3))
    record_property("reconnect_s_max", round(max(reconnects), 3))
