"""Helpers shared by the HTTP agents (``openai``, ``http``): a server-sent events parser, header lines.

The SSE parser follows the WHATWG event-stream format closely enough for LLM APIs: ``data:`` lines
of one event are joined with newlines, an empty line ends the event, comment lines (``:``) and
other fields are ignored.  It is fed one decoded line at a time, so it never buffers a whole answer.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp

from gateway.agent import Agent
from gateway.errors import AgentError, AgentTimeout

__all__ = [
    "HttpSessionAgent",
    "SSEParser",
    "check_header_lines",
    "connection_error",
    "header_lines",
    "iter_lines",
    "iter_text",
    "read_with_idle_timeout",
]


class SSEParser:
    """Turns event-stream lines into event data strings (one per complete event)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Feed one line (without or with its line ending); return an event's data when one ends."""
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return None

    def flush(self) -> str | None:
        """End the current event (at a blank line or at the end of the stream)."""
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        return data


async def read_with_idle_timeout(coro: Any, idle_timeout: float) -> Any:
    """Await one read from the response, raising :class:`AgentTimeout` after ``idle_timeout``."""
    try:
        async with asyncio.timeout(idle_timeout):
            return await coro
    except TimeoutError:
        raise AgentTimeout(
            f"The agent sent nothing for {idle_timeout:g} s and was stopped."
        ) from None


async def iter_lines(content: aiohttp.StreamReader, idle_timeout: float) -> AsyncIterator[str]:
    """Decoded lines of a response body as they arrive (UTF-8, invalid bytes replaced)."""
    while True:
        raw: bytes = await read_with_idle_timeout(content.readline(), idle_timeout)
        if not raw:
            return
        yield raw.decode("utf-8", errors="replace")


async def iter_text(content: aiohttp.StreamReader, idle_timeout: float) -> AsyncIterator[str]:
    """Decoded pieces of a response body as they arrive; multi-byte characters are never split."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        raw: bytes = await read_with_idle_timeout(content.readany(), idle_timeout)
        if not raw:
            tail = decoder.decode(b"", final=True)
            if tail:
                yield tail
            return
        text = decoder.decode(raw)
        if text:
            yield text


def check_header_lines(_instance: Any, _attribute: Any, value: Iterable[str]) -> None:
    """attrs validator: every item is ``"Name: value"`` (the value is never echoed in errors)."""
    for index, line in enumerate(value):
        name, sep, _ = line.partition(":")
        if not sep or not name.strip() or any(c.isspace() for c in name.strip()):
            raise ValueError(f'item {index} must look like "Name: value"')


def header_lines(lines: Iterable[str]) -> dict[str, str]:
    """``["Name: value", ...]`` as a dict (validated beforehand by :func:`check_header_lines`)."""
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    return headers


def connection_error(exc: BaseException, *, answered: bool) -> AgentError:
    """A readable error for a network failure (never including URLs' credentials or headers)."""
    if answered:
        return AgentError("The agent's answer was cut off.")
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return AgentTimeout("The agent did not respond in time.")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return AgentError("Could not connect to the agent.")
    return AgentError("The connection to the agent failed.")


class HttpSessionAgent(Agent):
    """An agent that talks HTTP: one aiohttp session, opened on first use, closed by ``close()``
    (and reopened if used again).  Time limits are per request, so the session has none."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                trust_env=True, timeout=aiohttp.ClientTimeout(total=None)
            )
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()
