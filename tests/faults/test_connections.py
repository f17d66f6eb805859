"""Connection faults: the platform says goodbye, refuses new connections for a while, restarts on
the same port.  Each time the gateway must come back on its own and answer."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway_testkit.harness import FaultInjection

from ._support import Start, assert_answered_once, wait_connected


async def test_a_server_disconnect_is_followed_by_a_reconnection_and_answers(
    start: Start, harness: FaultInjection, record_property: pytest.RecordProperty
) -> None:
    async with asyncio.timeout(30):
        runtime = await start()
        before = await harness.send("before the goodbye")
        assert await harness.server_disconnect() == 1
        back = await wait_connected(harness)
        record_property("reconnect_after_server_disconnect_s", round(back, 3))
        after = await harness.send("after the goodbye")
        await assert_answered_once(
            harness, {before: "before the goodbye", after: "after the goodbye"}
        )
        assert runtime.status.reconnects >= 1


async def test_refused_connections_are_retried_until_the_platform_accepts_again(
    start: Start, harness: FaultInjection, record_property: pytest.RecordProperty
) -> None:
    async with asyncio.timeout(30):
        runtime = await start()
        harness.refuse_connections(True)
        await harness.drop_connections()
        await asyncio.sleep(1.5)  # several attempts at the test's reconnect backoff (0.05-0.2 s)
        assert harness.connections() == 0
        assert runtime.status.reconnects >= 2, "the gateway stopped trying while refused"
        # A message the platform holds while the gateway cannot connect is pushed once it is back.
        waiting = asyncio.create_task(harness.send("sent while refused"))
        await asyncio.sleep(0.5)
        allowed = time.monotonic()
        harness.refuse_connections(False)
        await wait_connected(harness)
        record_property("reconnect_after_refusal_ends_s", round(time.monotonic() - allowed, 3))
        message_id = await waiting
        await assert_answered_once(harness, {message_id: "sent while refused"})


async def test_a_platform_restart_on_the_same_port_is_survived(
    start: Start, harness: FaultInjection, record_property: pytest.RecordProperty
) -> None:
    async with asyncio.timeout(30):
        await start()
        before = await harness.send("before the restart")
        await assert_answered_once(harness, {before: "before the restart"})
        restarted = time.monotonic()
        await harness.restart()
        await wait_connected(harness)
        record_property("reconnect_after_restart_s", round(time.monotonic() - restarted, 3))
        after = await harness.send("after the restart")
        await assert_answered_once(
            harness, {before: "before the restart", after: "after the restart"}
        )
