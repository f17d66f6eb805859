"""The python agent: answers with a Python callable of your own, named ``"package.module:attr"``.

The callable is imported when the configuration is validated (an import error is reported with the
file and key) and gets the :class:`~gateway.agent.AgentRequest`.  It may be any of:

* a function returning ``str`` (run in a worker thread, so it may block);
* a generator yielding ``str`` chunks (iterated in worker threads);
* an ``async def`` returning ``str``;
* an async generator yielding ``str`` chunks;
* a callable object whose ``__call__`` is one of these, or a function that *returns* a str, an
  iterable / async iterable of str or an awaitable of one of these.

Anything that is not text is reported to the user as an agent error; an exception is reported as
"The agent failed while answering." with the cause chained (the core logs it).

Adapting callback-style code (JitAi and the like)
-------------------------------------------------
Agent frameworks often expose a blocking ``agent.run(params, chatId, stream_callback)`` that calls
``stream_callback(chunk)`` for each piece of the answer.  :func:`from_stream_callback` turns that into
an async generator: ``run`` goes to a worker thread, and each callback hands its chunk to the event
loop through ``loop.call_soon_threadsafe``.  In essence::

    async def answer(request):
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
        put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)
        def work():
            try:
                agent.run({"question": request.text}, request.session_key, put)
            finally:
                put(DONE)
        done = loop.run_in_executor(agent_executor(), work)
        while (chunk := await queue.get()) is not DONE:
            yield chunk
        await done  # re-raises what run raised

So a module ``my_bot.py`` with ``answer = from_stream_callback(agent.run)`` is configured as
``[agent] type = "python"`` and ``callable = "my_bot:answer"``.  Note that a thread cannot be
stopped: on /stop the gateway stops listening at once, but ``run`` goes on until it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import importlib
import inspect
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any

import attrs

from gateway.agent import (
    Agent,
    AgentRequest,
    agent_executor,
    call_in_thread,
    iterate_in_thread,
)
from gateway.errors import AgentError

__all__ = [
    "PythonAgent",
    "PythonAgentSettings",
    "default_params",
    "from_stream_callback",
    "load_callable",
]

_FAILED = "The agent failed while answering."
_NOT_TEXT = "The agent produced something that is not text."


def load_callable(reference: str) -> Callable[..., Any]:
    """Import ``"package.module:attr"`` (``attr`` may be dotted); ValueError with a readable text."""
    module_name, sep, attr_path = reference.partition(":")
    if not sep or not module_name.strip() or not attr_path.strip():
        raise ValueError(f"callable {reference!r} must look like 'package.module:attribute'")
    try:
        target: Any = importlib.import_module(module_name.strip())
    except Exception as exc:
        raise ValueError(
            f"callable {reference!r}: cannot import module {module_name.strip()!r} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    for part in attr_path.strip().split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(
                f"callable {reference!r}: module {module_name.strip()!r} has no attribute "
                f"{attr_path.strip()!r}"
            ) from None
    if not callable(target):
        raise ValueError(f"callable {reference!r} is not callable ({type(target).__name__})")
    return target


@attrs.frozen
class PythonAgentSettings:
    callable: str = attrs.field(
        metadata={"help": "the function answering, as 'package.module:attribute'"}
    )
    # Imported at validation time, so a bad reference is a config error with file and key.
    target: Any = attrs.field(init=False, eq=False, repr=False, default=None)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "target", load_callable(self.callable))


def _kind(target: Any) -> str:
    """ "asyncgen", "coroutine", "generator" or "function" (anything else that is callable)."""
    func = target
    if not (inspect.isroutine(func) or isinstance(func, functools.partial)):
        func = type(func).__call__  # a callable object: look at __call__
    if inspect.isasyncgenfunction(func):
        return "asyncgen"
    if inspect.iscoroutinefunction(func):
        return "coroutine"
    if inspect.isgeneratorfunction(func):
        return "generator"
    return "function"


def _text(chunk: Any) -> str:
    if not isinstance(chunk, str):
        raise AgentError(_NOT_TEXT)
    return chunk


async def _chunks_of(result: Any, depth: int = 0) -> AsyncGenerator[str, None]:
    """The str chunks of whatever a callable returned."""
    if isinstance(result, str):
        yield result
    elif isinstance(result, bytes | bytearray) or depth > 3:
        raise AgentError(_NOT_TEXT)
    elif inspect.isawaitable(result):
        async for chunk in _chunks_of(await result, depth + 1):
            yield chunk
    elif isinstance(result, AsyncIterable):
        async for chunk in _aiter_closing(result):
            yield chunk
    elif isinstance(result, Iterable):
        async for chunk in _iter_closing(result):
            yield chunk
    else:
        raise AgentError(_NOT_TEXT)


async def _aiter_closing(chunks: AsyncIterable[Any]) -> AsyncGenerator[str, None]:
    iterator = aiter(chunks)
    try:
        async for chunk in iterator:
            yield _text(chunk)
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


async def _iter_closing(chunks: Iterable[Any]) -> AsyncGenerator[str, None]:
    iterator = iter(chunks)
    try:
        async for chunk in iterate_in_thread(iterator):
            yield _text(chunk)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            # Fails with ValueError while a worker thread is still inside it (cancelled mid-chunk).
            with contextlib.suppress(Exception):
                close()


class PythonAgent(Agent):
    title = "Python"
    description = "Answers with a Python function (sync or async, returning or yielding text)."
    settings_class = PythonAgentSettings

    settings: PythonAgentSettings

    def __init__(self, settings: PythonAgentSettings) -> None:
        super().__init__(settings)
        self.target: Callable[..., Any] = settings.target
        self.kind = _kind(self.target)

    async def stream(self, request: AgentRequest) -> AsyncIterator[str]:
        chunks: AsyncGenerator[str, None]
        try:
            if self.kind == "asyncgen":
                chunks = _aiter_closing(self.target(request))
            elif self.kind == "coroutine":
                chunks = _chunks_of(self.target(request))
            elif self.kind == "generator":
                chunks = _iter_closing(self.target(request))
            else:
                chunks = _chunks_of(await call_in_thread(self.target, request))
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()
        except AgentError:
            raise
        except Exception as exc:
            raise AgentError(_FAILED) from exc


_DONE = object()


def default_params(request: AgentRequest) -> dict[str, Any]:
    """The ``params`` :func:`from_stream_callback` passes by default."""
    return {
        "question": request.text,
        "sender_id": request.sender_id,
        "sender_name": request.sender_name,
        "history": [{"question": t.question, "answer": t.answer} for t in request.history],
    }


def from_stream_callback(
    run: Callable[[Any, str, Callable[[str], None]], Any],
    *,
    params: Callable[[AgentRequest], Any] = default_params,
) -> Callable[[AgentRequest], AsyncIterator[str]]:
    """Adapt a blocking ``run(params, chat_id, stream_callback)`` to an async generator callable.

    ``run`` runs in a worker thread; every ``stream_callback(chunk)`` becomes a yielded chunk, in
    order.  ``chat_id`` is the request's session key.  If ``run`` streamed nothing and returned a
    str, that str is the answer.  What ``run`` raises is raised here.
    """

    async def answer(request: AgentRequest) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:
            # After a cancellation the loop may be closed while run goes on: drop its chunks.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> Any:
            try:
                return run(params(request), request.session_key, put)
            finally:
                put(_DONE)

        done = loop.run_in_executor(agent_executor(), contextvars.copy_context().run, work)
        # If we stop listening early, still retrieve the outcome so asyncio does not log it.
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        streamed = False
        while (chunk := await queue.get()) is not _DONE:
            streamed = True
            yield chunk
        result = await done
        if not streamed and isinstance(result, str):
            yield result

    return answer
