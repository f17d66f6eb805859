"""Local HTTP servers for the ``openai`` and ``http`` agents' tests: real aiohttp servers on 127.0.0.1.

:class:`LLMServer` emulates ``POST /v1/chat/completions`` with ``"stream": true`` (server-sent events).
:class:`AgentHttpServer` is a scripted endpoint for the ``http`` agent (SSE, plain text, JSON).
Both are scripted by setting attributes between (or during) requests, and record every request.

By default both *echo*: the answer is the last user message, sent a word at a time.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import attrs
from aiohttp import web

__all__ = ["AgentHttpServer", "LLMServer", "RecordedRequest", "words"]


def words(text: str) -> list[str]:
    """``text`` in chunks that join back to it exactly (a word with its following whitespace)."""
    return re.findall(r"\S+\s*|\s+", text) or [""]


@attrs.define
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the parsed JSON body (None if it was not JSON)


class _Server:
    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.sent: list[str] = []  # every chunk written, in order (all requests)

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        hold = getattr(self, "hold_last", None)
        if hold is not None:
            hold.set()  # let held handlers finish
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Any:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _record(self, request: web.Request) -> RecordedRequest:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        recorded = RecordedRequest(request.method, request.path, dict(request.headers), body)
        self.requests.append(recorded)
        return recorded

    async def _write(self, response: web.StreamResponse, data: str) -> None:
        await response.write(data.encode())

    async def _abort(self, request: web.Request) -> None:
        # Let what was written reach the client, then cut the connection without ending the body.
        await asyncio.sleep(0.1)
        transport = request.transport
        if transport is not None:
            transport.abort()


class LLMServer(_Server):
    """An OpenAI-compatible chat completions server.  Attributes script the next requests."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] | None = None  # None: echo the last user message word by word
        self.reasoning: list[str] = []  # reasoning deltas sent before the content
        self.reasoning_field = "reasoning_content"
        self.delay = 0.0  # seconds before each chunk
        self.status = 200  # the status of every request (after fail_first)
        self.fail_first = 0  # the first K requests fail with fail_status
        self.fail_status = 429
        self.retry_after: str | None = None  # Retry-After header of the failures
        self.malformed = False  # interleave malformed SSE lines
        self.send_done = True
        self.disconnect_after: int | None = None  # abort the connection after N content chunks
        self.hold_last: asyncio.Event | None = None  # wait for it before sending the last chunk
        self.json_response = False  # ignore "stream" and answer with one JSON body
        self.header_delay = 0.0  # seconds before the response starts (status and headers)

    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._handle)

    def messages(self, index: int = -1) -> list[dict[str, Any]]:
        body = self.requests[index].body
        assert isinstance(body, dict)
        return list(body["messages"])

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        number = len(self.requests)
        if self.header_delay:
            await asyncio.sleep(self.header_delay)
        if number <= self.fail_first or self.status != 200:
            status = self.fail_status if number <= self.fail_first else self.status
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            return web.json_response(
                {"error": {"message": f"scripted failure {status}"}}, status=status, headers=headers
            )
        body = recorded.body if isinstance(recorded.body, dict) else {}
        chunks = self.chunks
        if chunks is None:
            user = [m for m in body.get("messages", []) if m.get("role") == "user"]
            chunks = words(str(user[-1]["content"])) if user else []
        if self.json_response:
            message = {"role": "assistant", "content": "".join(chunks)}
            return web.json_response({"choices": [{"index": 0, "message": message}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        model = body.get("model", "")

        def event(delta: dict[str, Any]) -> str:
            data = {"object": "chat.completion.chunk", "model": model}
            data["choices"] = [{"index": 0, "delta": delta, "finish_reason": None}]
            return f"data: {json.dumps(data)}\n\n"

        await self._write(response, event({"role": "assistant", "content": ""}))
        for piece in self.reasoning:
            if self.delay:
                await asyncio.sleep(self.delay)
            await self._write(response, event({self.reasoning_field: piece}))
        for index, chunk in enumerate(chunks):
            if self.disconnect_after is not None and index >= self.disconnect_after:
                await self._abort(request)
                return response
            if self.hold_last is not None and index == len(chunks) - 1:
                await self.hold_last.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.malformed:
                await self._write(response, "data: {not json\n\n")
                await self._write(response, "garbage without a colon\n\n")
                await self._write(response, ": a comment\n")
                await self._write(response, "data: [1, 2]\n\n")
            await self._write(response, event({"content": chunk}))
            self.sent.append(chunk)
        if self.send_done:
            await self._write(response, "data: [DONE]\n\n")
        await response.write_eof()
        return response


class AgentHttpServer(_Server):
    """A scripted endpoint for the ``http`` agent at ``POST /agent``.

    ``mode``: ``"sse"`` (events ``data: {"text": chunk}``), ``"sse-raw"`` (events with the raw
    chunk), ``"text"`` (a chunked ``text/plain`` body) or ``"json"`` (``{"answer": ...}``).
    """

    def __init__(self, mode: str = "sse") -> None:
        super().__init__()
        self.mode = mode
        self.chunks: list[str] | None = None  # None: echo the request's text word by word
        self.delay = 0.0
        self.status = 200
        self.disconnect_after: int | None = None
        self.hold_last: asyncio.Event | None = None
        self.json_field = "answer"

    @property
    def url(self) -> str:
        return f"{self.origin}/agent"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/agent", self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        if self.status != 200:
            return web.Response(status=self.status, text=f"scripted failure {self.status}")
        body = recorded.body if isinstance(recorded.body, dict) else {}
        chunks = self.chunks if self.chunks is not None else words(str(body.get("text", "")))
        if self.mode == "json":
            return web.json_response({self.json_field: "".join(chunks)})
        content_type = "text/plain; charset=utf-8" if self.mode == "text" else "text/event-stream"
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        for index, chunk in enumerate(chunks):
            if self.disconnect_after is not None and index >= self.disconnect_after:
                await self._abort(request)
                return response
            if self.hold_last is not None and index == len(chunks) - 1:
                await self.hold_last.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.mode == "text":
                data = chunk
            elif self.mode == "sse-raw":
                data = "".join(f"data: {line}\n" for line in chunk.split("\n")) + "\n"
            else:
                data = f"data: {json.dumps({'text': chunk})}\n\n"
            await self._write(response, data)
            self.sent.append(chunk)
        if self.mode.startswith("sse"):
            await self._write(response, "data: [DONE]\n\n")
        await response.write_eof()
        return response
