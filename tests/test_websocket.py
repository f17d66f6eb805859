"""The core's websocket helpers: the frame tasks a driver drains before closing its socket."""

from __future__ import annotations

import asyncio
import time

from gateway.websocket import FrameTasks


async def test_drain_lets_running_frames_finish_then_cancels_the_rest() -> None:
    tasks = FrameTasks()
    acked: list[str] = []
    stuck = asyncio.Event()

    async def frame(name: str, seconds: float) -> None:
        try:
            await asyncio.sleep(seconds)  # storing the message
            acked.append(name)
        except asyncio.CancelledError:
            stuck.set()
            raise

    tasks.spawn(frame("quick", 0.05))
    tasks.spawn(frame("slow", 0.1))
    tasks.spawn(frame("stuck", 60))  # an inbox that never answers must not hold up the shutdown
    began = time.monotonic()
    await tasks.drain(timeout=0.3)
    assert 0.25 <= time.monotonic() - began < 1.0
    assert acked == ["quick", "slow"] and stuck.is_set()


async def test_drain_returns_at_once_when_nothing_runs() -> None:
    # Done within the loop's first turn: no timer was waited on (a drain that waited for its
    # timeout would still be pending here).
    draining = asyncio.create_task(FrameTasks().drain(timeout=5))
    await asyncio.sleep(0)
    assert draining.done()
    await draining


async def test_cancel_does_not_wait() -> None:
    tasks = FrameTasks()
    acked: list[str] = []

    async def frame() -> None:
        await asyncio.sleep(0.05)
        acked.append("late")

    tasks.spawn(frame())
    await tasks.cancel()  # the connection is gone: an ACK could not be sent anyway
    assert acked == []
