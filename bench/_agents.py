"""The benchmark agents, for the gateway's ``python`` agent and for the baseline clients alike.

The gateway imports them as ``[agent] type = "python"``, ``callable = "_agents:NAME"`` (``bench/``
is on the child's ``PYTHONPATH``); the baseline clients call the blocking twins through
:func:`run_blocking`, the shape of the reference design's ``agent.run(params, chatId,
stream_callback)``.  Both produce the same text with the same timing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from gateway.agent import AgentRequest

#: "500 chunks over 10 s" (the streaming scenario); the run may shrink both with --quick.
CHUNKS = 500
CHUNK_SECONDS = 10.0
SLOW_SECONDS = 1.0


async def sleep_async(request: AgentRequest) -> str:
    """One second of (non-blocking) thinking, then the question back."""
    await asyncio.sleep(SLOW_SECONDS)
    return request.text


def sleep_sync(request: AgentRequest) -> str:
    """The same, written as blocking code: the python agent runs it in a worker thread."""
    time.sleep(SLOW_SECONDS)
    return request.text


async def chunks(request: AgentRequest) -> AsyncIterator[str]:
    """``CHUNKS`` chunks spread evenly over ``CHUNK_SECONDS`` (an LLM streaming tokens)."""
    count, seconds = _chunk_plan(request.text)
    start = time.monotonic()
    for i in range(count):
        # Sleep to the chunk's due time, not a fixed step, so the total stays CHUNK_SECONDS.
        await asyncio.sleep(max(0.0, start + (i + 1) * seconds / count - time.monotonic()))
        yield _chunk(i, count)


def _chunk_plan(text: str) -> tuple[int, float]:
    """``"chunks COUNT SECONDS"`` in the message overrides the defaults (--quick uses it)."""
    parts = text.split()
    if len(parts) == 3 and parts[0] == "chunks":
        return int(parts[1]), float(parts[2])
    return CHUNKS, CHUNK_SECONDS


def run_blocking(kind: str, text: str, stream_callback: Callable[[str], None]) -> str:
    """The baselines' synchronous agent: ``instant`` echoes, ``sleep`` takes a second, ``chunks``
    calls ``stream_callback`` per chunk as it comes; returns the whole answer."""
    if kind == "instant":
        return text
    if kind == "sleep":
        time.sleep(SLOW_SECONDS)
        return text
    count, seconds = _chunk_plan(text)
    start = time.monotonic()
    answer = []
    for i in range(count):
        time.sleep(max(0.0, start + (i + 1) * seconds / count - time.monotonic()))
        answer.append(_chunk(i, count))
        stream_callback(answer[-1])
    return "".join(answer)


def _chunk(i: int, count: int) -> str:
    """Chunk ``i``; the last one carries ``@<time.monotonic()>`` (a system-wide clock on Linux),
    so the benchmark can time "last chunk to final card" from the card's text."""
    return f"w{i} @{time.monotonic():.6f}" if i == count - 1 else f"w{i} "
