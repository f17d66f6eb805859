"""Callables for the ``python`` agent's tests (``callable = "gateway_testkit.python_agents:..."``)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from gateway.agent import AgentRequest
from gateway.agents.python import from_stream_callback


def sync_str(request: AgentRequest) -> str:
    return f"sync: {request.text}"


def sync_gen(request: AgentRequest) -> Iterator[str]:
    yield "sync "
    yield "gen: "
    yield request.text


async def async_str(request: AgentRequest) -> str:
    await asyncio.sleep(0)
    return f"async: {request.text}"


async def async_gen(request: AgentRequest) -> AsyncIterator[str]:
    for word in ("async ", "gen: ", request.text):
        await asyncio.sleep(0)
        yield word


def returns_list(request: AgentRequest) -> list[str]:
    """A plain function returning an iterable of chunks."""
    return ["list ", request.text]


def returns_awaitable(request: AgentRequest) -> Any:
    """A plain function returning a coroutine."""
    return async_str(request)


class CallableObject:
    """A callable object whose ``__call__`` is an async generator."""

    async def __call__(self, request: AgentRequest) -> AsyncIterator[str]:
        yield "object: "
        yield request.text


callable_object = CallableObject()


def raises(request: AgentRequest) -> str:
    raise RuntimeError("boom from the test agent")


async def raises_midway(request: AgentRequest) -> AsyncIterator[str]:
    yield "partial "
    raise RuntimeError("boom midway")


def returns_int(request: AgentRequest) -> int:
    return 42


async def yields_non_str(request: AgentRequest) -> AsyncIterator[Any]:
    yield "ok "
    yield 42


not_callable = "just a string"


class JitAiStyleAgent:
    """Mimics a JitAi agent: a blocking ``run(params, chatId, stream_callback)`` streaming chunks."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, str]] = []
        self.threads: list[str] = []

    def run(self, params: Any, chatId: str, stream_callback: Callable[[str], None]) -> str:
        self.calls.append((params, chatId))
        self.threads.append(threading.current_thread().name)
        for i in range(5):
            time.sleep(0.01)
            stream_callback(f"chunk{i} ")
        return "final (ignored: chunks were streamed)"


jitai_agent = JitAiStyleAgent()
jitai_answer = from_stream_callback(jitai_agent.run)


async def show_history(request: AgentRequest) -> str:
    """Answers with the history it was given, as JSON (for the agent contract suite)."""
    return json.dumps([{"question": t.question, "answer": t.answer} for t in request.history])
