"""A ``python`` agent that misbehaves on request, one conversation at a time: the first word of
the question picks the fault, anything else is echoed word by word.  One instance thus mixes
failing and healthy conversations, which is what "others are unaffected" needs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from gateway.agent import AgentRequest


async def faulty(request: AgentRequest) -> AsyncIterator[Any]:
    fault = request.text.split(" ", 1)[0]
    match fault:
        case "raise":
            raise RuntimeError("agent exploded before answering")
        case "midway":
            yield "partial answer "
            await asyncio.sleep(0.1)
            raise RuntimeError("agent exploded mid-stream")
        case "silent":
            yield "let me think "
            await asyncio.Event().wait()  # silent past the idle timeout
        case "endless":
            while True:  # never silent, never done: past the total timeout
                yield "more "
                await asyncio.sleep(0.2)
        case "nontext":
            yield "this is "
            yield 42
        case _:
            for i, word in enumerate(request.text.split(" ")):
                await asyncio.sleep(0.05)
                yield f" {word}" if i else word
