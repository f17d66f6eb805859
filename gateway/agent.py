"""The agent interface: the thing that answers.

An agent plugin (entry-point group ``gateway.agents``) turns an :class:`AgentRequest` into an async
stream of text chunks.  The core enforces time limits (:func:`stream_answer`), so an agent only has to
produce text; blocking code goes through :func:`iterate_in_thread` / :func:`call_in_thread`.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, ClassVar, TypeVar

import attrs

from gateway.errors import AgentError, AgentTimeout
from gateway.models import Attachment, ConversationKind, Incoming

__all__ = [
    "Agent",
    "AgentRequest",
    "HistoryTurn",
    "call_in_thread",
    "iterate_in_thread",
    "stream_answer",
]

T = TypeVar("T")


@attrs.frozen
class HistoryTurn:
    """One earlier exchange in the same session."""

    question: str
    answer: str


@attrs.frozen
class AgentRequest:
    """Everything an agent gets to answer one message."""

    instance: str
    session_key: str
    text: str
    sender_id: str
    sender_name: str
    conversation_id: str
    conversation_kind: ConversationKind
    message_id: str
    attachments: tuple[Attachment, ...] = ()
    history: tuple[HistoryTurn, ...] = ()

    @classmethod
    def for_message(
        cls, message: Incoming, *, session_key: str, history: Iterable[HistoryTurn] = ()
    ) -> AgentRequest:
        return cls(
            instance=message.instance,
            session_key=session_key,
            text=message.text,
            sender_id=message.sender_id,
            sender_name=message.sender_name,
            conversation_id=message.conversation_id,
            conversation_kind=message.conversation_kind,
            message_id=message.message_id,
            attachments=message.attachments,
            history=tuple(history),
        )


class Agent(abc.ABC):
    """Base class of agent plugins.

    ``settings_class`` is an attrs class: the schema of the instance file's ``[agent]`` table (beside
    ``type``).  One agent object serves one instance, possibly many requests concurrently.
    """

    title: ClassVar[str] = ""
    description: ClassVar[str] = ""
    settings_class: ClassVar[type[Any]]

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    @abc.abstractmethod
    def stream(self, request: AgentRequest) -> AsyncIterator[str]:
        """Yield the answer as text chunks (deltas, in order).

        Must not block the event loop: wrap blocking calls with :func:`call_in_thread` or
        :func:`iterate_in_thread`.  Raise :class:`~gateway.errors.AgentError` with a readable text for
        failures the user should see; any other exception is shown as a generic error and logged.
        Cancellation (timeout, /stop, shutdown) arrives as ``CancelledError`` at an ``await``.
        """

    async def close(self) -> None:
        """Release resources (HTTP sessions...).  Called once when the instance stops."""


#: Upper bound of agent worker threads.  Threads start only when needed, so this costs nothing
#: unused; the real limit is each instance's ``concurrency``.  asyncio's default pool
#: (``min(32, cpus + 4)``: 6 threads on two cores) would cap blocking agents at 6 turns at once,
#: whatever the setting, and a thread that hangs past its timeout would hold a slot for good.
AGENT_THREADS = 512
_executor: concurrent.futures.ThreadPoolExecutor | None = None


def agent_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The worker threads of blocking agent code (sync callables and generators)."""
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(AGENT_THREADS, "agent")
    return _executor


async def call_in_thread(func: Callable[..., T], *args: Any) -> T:
    """Run a blocking callable in an agent worker thread (with the caller's context, so its log
    lines name the instance)."""
    context = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(agent_executor(), functools.partial(context.run, func, *args))


_DONE = object()


async def iterate_in_thread(iterable: Iterable[T]) -> AsyncIterator[T]:
    """Iterate a blocking iterable (a sync generator) in worker threads, yielding on the loop."""
    iterator: Iterator[T] = iter(iterable)
    while True:
        item = await call_in_thread(next, iterator, _DONE)
        if item is _DONE:
            return
        yield item


async def stream_answer(
    agent: Agent, request: AgentRequest, *, timeout: float, idle_timeout: float
) -> AsyncIterator[str]:
    """Stream the agent's chunks, enforcing a total time limit and a limit between chunks.

    Raises :class:`AgentTimeout` on either limit and :class:`AgentError` (with the cause chained) when
    the agent raises anything else, so callers deal with one error type.  Non-str chunks are an agent
    bug and are reported as such.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    chunks = agent.stream(request)
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AgentTimeout(f"The agent did not finish within {timeout:g} s.")
            wait = min(idle_timeout, remaining)
            try:
                async with asyncio.timeout(wait):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if wait < idle_timeout:
                    raise AgentTimeout(f"The agent did not finish within {timeout:g} s.") from None
                raise AgentTimeout(
                    f"The agent sent nothing for {idle_timeout:g} s and was stopped."
                ) from None
            except AgentError:
                raise
            except Exception as exc:
                raise AgentError("The agent failed while answering.") from exc
            if not isinstance(chunk, str):
                raise AgentError("The agent produced something that is not text.")
            yield chunk
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
