"""Echo's HTTP endpoint: post a message, watch its reply stream back as server-sent events.

    POST /messages            {"text", "conversation", "sender", "sender_name", "id", "kind"}
                              -> text/event-stream of the reply's events (see ``_transcript``)
    GET  /messages/{id}       -> {"id", "reply_id", "state", "text", "events"}
    GET  /messages/{id}/events -> the same event stream: past events, then new ones
    POST /feedback            {"message_id", "user", "rating", "comment"} -> 204
    GET  /sent                -> {"messages": [...]}: the proactive messages sent (outbound API)

Errors are JSON ``{"error": "..."}``.  Each SSE event is ``event: NAME`` plus ``data:`` with the
event dict as JSON (including its ``"event"`` key).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection, Mapping
from typing import Any

from aiohttp import web

from gateway.driver import DriverContext
from gateway.errors import ShuttingDown
from gateway.models import ConversationKind, FeedbackEvent, Incoming
from gateway_echo._sent import SentMessages
from gateway_echo._transcript import Event, Transcript, Transcripts

__all__ = ["make_app"]

_KINDS = [kind.value for kind in ConversationKind]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Problem(Exception):
    """A request that cannot be served; answered as JSON ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def make_app(
    context: DriverContext, transcripts: Transcripts, sent: SentMessages, stop: asyncio.Event
) -> web.Application:
    """The endpoint's application.  Streams end when ``stop`` is set (and readers are woken)."""
    endpoint = _Endpoint(context, transcripts, stop)

    @web.middleware
    async def sign_of_life(request: web.Request, handler: Handler) -> web.StreamResponse:
        # For a real platform this is a websocket frame or a webhook call; here, any request.
        context.frame_received()
        try:
            return await handler(request)
        except _Problem as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)

    async def get_sent(request: web.Request) -> web.Response:
        return web.json_response(sent.to_json())

    app = web.Application(middlewares=[sign_of_life])
    app.add_routes(
        [
            web.post("/messages", endpoint.post_message),
            web.get("/messages/{id}", endpoint.get_message),
            web.get("/messages/{id}/events", endpoint.get_events),
            web.post("/feedback", endpoint.post_feedback),
            web.get("/sent", get_sent),
        ]
    )
    return app


class _Endpoint:
    def __init__(
        self, context: DriverContext, transcripts: Transcripts, stop: asyncio.Event
    ) -> None:
        self._context = context
        self._transcripts = transcripts
        self._stop = stop

    async def post_message(self, request: web.Request) -> web.StreamResponse:
        fields = _Fields(await _json_object(request))
        message_id = fields.string("id", uuid.uuid4().hex, empty=False)
        conversation_id = fields.string("conversation", "default", empty=False)
        kind = fields.string("kind", "single", choices=_KINDS)
        sender_id = fields.string("sender", "user", empty=False)
        sender_name = fields.string("sender_name", "")
        text = fields.string("text")
        body = fields.check()
        message = Incoming.create(
            instance=self._context.instance,
            message_id=message_id,
            conversation_id=conversation_id,
            conversation_kind=kind,
            sender_id=sender_id,
            sender_name=sender_name,
            text=text,
            raw=body,
        )
        try:
            transcript = await self._transcripts.deliver(self._context, message)
        except ShuttingDown as exc:
            # Not stored, so not acknowledged: the client should send it again later.
            raise _Problem(503, "the gateway is shutting down; send the message again") from exc
        if transcript is None:
            return await _send_events(
                request, _one({"event": "duplicate", "id": message.message_id})
            )
        return await self._stream(request, transcript)

    async def get_message(self, request: web.Request) -> web.Response:
        return web.json_response(self._find(request.match_info["id"]).to_json())

    async def get_events(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, self._find(request.match_info["id"]))

    async def post_feedback(self, request: web.Request) -> web.Response:
        fields = _Fields(await _json_object(request))
        message_id = fields.string("message_id", empty=False)
        user_id = fields.string("user", empty=False)
        rating = fields.string("rating", empty=False)
        comment = fields.string("comment", "")
        fields.check()
        event = FeedbackEvent.create(
            instance=self._context.instance,
            # The core keys feedback by reply id, which only the message can tell.
            reply_id=self._find(message_id).message.reply_id,
            user_id=user_id,
            rating=rating,
            message_id=message_id,
            comment=comment,
        )
        await self._context.feedback(event)
        return web.Response(status=204)

    def _find(self, message_id: str) -> Transcript:
        transcript = self._transcripts.get(message_id)
        if transcript is None:
            raise _Problem(404, f"unknown message id {message_id!r}")
        return transcript

    async def _stream(self, request: web.Request, transcript: Transcript) -> web.StreamResponse:
        async with contextlib.aclosing(self._transcripts.follow(transcript, self._stop)) as events:
            return await _send_events(request, events)


async def _send_events(request: web.Request, events: AsyncIterator[Event]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    await response.prepare(request)
    try:
        async for event in events:
            # json.dumps escapes newlines, so the data always fits on the one line SSE needs.
            data = json.dumps(event, ensure_ascii=False)
            await response.write(f"event: {event['event']}\ndata: {data}\n\n".encode())
        await response.write_eof()
    except ConnectionResetError:
        # The client left.  Only this stream ends: the reply goes on and stays readable.
        pass
    return response


async def _one(event: Event) -> AsyncGenerator[Event, None]:
    yield event


async def _json_object(request: web.Request) -> Mapping[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:  # bad JSON or bad UTF-8
        raise _Problem(400, f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _Problem(400, "the body must be a JSON object")
    return body


class _Fields:
    """Reads a request's fields and collects every problem, so a client can fix them all at once."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        self._body = body
        self._problems: list[str] = []

    def string(
        self,
        name: str,
        default: str | None = None,
        *,
        empty: bool = True,
        choices: Collection[str] = (),
    ) -> str:
        """The string field ``name``, or ``default`` when absent (then required if None)."""
        if name not in self._body:
            if default is not None:
                return default
            self._problems.append(f"field {name!r} is required")
            return ""
        value = self._body[name]
        if not isinstance(value, str):
            self._problems.append(f"field {name!r} must be a string")
        elif not value and not empty:
            self._problems.append(f"field {name!r} must not be empty")
        elif choices and value not in choices:
            self._problems.append(f"field {name!r} must be one of {', '.join(choices)}")
        else:
            return value
        return ""

    def check(self) -> Mapping[str, Any]:
        """The body, if every field read was valid."""
        if self._problems:
            raise _Problem(400, "; ".join(self._problems))
        return self._body
