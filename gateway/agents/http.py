"""The http agent: POSTs each message as JSON to a URL you own and streams the response back.

This is how Dify/Coze workflows, in-house bots and services in any language plug in without Python.
The request body::

    {"text": ..., "sender_id": ..., "sender_name": ..., "conversation_id": ...,
     "conversation_kind": "single" | "group", "session_key": ..., "message_id": ..., "instance": ...,
     "history": [{"question": ..., "answer": ...}, ...],          # oldest first
     "attachments": [{"kind": ..., "name": ..., "url": ...}, ...]}

The response may be:

* ``text/event-stream``: each event's data is a chunk; if the data is a JSON object with a string
  ``"text"``, ``"content"`` or ``"delta"`` field, that field is the chunk (``data: [DONE]`` ends it);
* ``application/json``: an object whose ``"text"`` or ``"answer"`` string is the answer;
* anything else (``text/plain``...): the body is the answer, streamed as it arrives.

A non-2xx status is shown to the user as an agent error naming it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs

from gateway.agent import AgentRequest
from gateway.agents._sse import (
    HttpSessionAgent,
    SSEParser,
    check_header_lines,
    connection_error,
    header_lines,
    iter_lines,
    iter_text,
    read_with_idle_timeout,
)
from gateway.errors import AgentError
from gateway.secrets import Secret

__all__ = ["HttpAgent", "HttpAgentSettings", "request_body"]

log = logging.getLogger(__name__)

_SSE_FIELDS = ("text", "content", "delta")
_JSON_FIELDS = ("text", "answer")


def _check_url(_instance: Any, _attribute: Any, value: str) -> None:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")


@attrs.frozen
class HttpAgentSettings:
    url: str = attrs.field(
        validator=_check_url, metadata={"help": "the URL each message is POSTed to as JSON"}
    )
    headers: list[str] = attrs.field(
        factory=list,
        validator=check_header_lines,
        metadata={"help": 'additional HTTP headers, each "Name: value"'},
    )
    token: Secret = attrs.field(
        default=Secret(""),
        metadata={"help": 'sent as "Authorization: Bearer <token>" (empty: not sent)'},
    )
    request_timeout: float = attrs.field(
        default=60.0,
        validator=attrs.validators.gt(0),
        metadata={"help": "seconds to wait for the response to start (connection and headers)"},
    )
    idle_timeout: float = attrs.field(
        default=120.0,
        validator=attrs.validators.gt(0),
        metadata={"help": "seconds to wait between two pieces of the streamed answer"},
    )


def request_body(request: AgentRequest) -> dict[str, Any]:
    """The JSON document POSTed for one message."""
    return {
        "text": request.text,
        "sender_id": request.sender_id,
        "sender_name": request.sender_name,
        "conversation_id": request.conversation_id,
        "conversation_kind": str(request.conversation_kind),
        "session_key": request.session_key,
        "message_id": request.message_id,
        "instance": request.instance,
        "history": [{"question": t.question, "answer": t.answer} for t in request.history],
        "attachments": [
            {"kind": a.kind, "name": a.name, "url": a.url} for a in request.attachments
        ],
    }


def _field(data: Any, names: tuple[str, ...]) -> str | None:
    if isinstance(data, dict):
        for name in names:
            value = data.get(name)
            if isinstance(value, str):
                return value
    return None


class HttpAgent(HttpSessionAgent):
    title = "HTTP endpoint"
    description = "POSTs each message as JSON to your URL and streams the response back."
    settings_class = HttpAgentSettings

    settings: HttpAgentSettings

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream, application/json;q=0.9, text/plain;q=0.8"}
        headers.update(header_lines(self.settings.headers))
        if self.settings.token:
            headers["Authorization"] = f"Bearer {self.settings.token.reveal()}"
        return headers

    async def stream(self, request: AgentRequest) -> AsyncIterator[str]:
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                response = await self._client().post(
                    self.settings.url, json=request_body(request), headers=self._headers()
                )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.debug("request to the agent failed: %s", type(exc).__name__)
            raise connection_error(exc, answered=False) from exc
        answered = False
        try:
            if not 200 <= response.status < 300:
                log.debug("the agent answered HTTP %d", response.status)
                raise AgentError(f"The agent failed (HTTP {response.status}).")
            kind = response.content_type
            if kind == "text/event-stream":
                chunks = self._events(response)
            elif kind == "application/json" or kind.endswith("+json"):
                chunks = self._json(response)
            else:
                chunks = iter_text(response.content, self.settings.idle_timeout)
            async for chunk in chunks:
                if chunk:
                    answered = True
                    yield chunk
        except (aiohttp.ClientError, OSError) as exc:
            log.debug("the agent's response failed: %s", type(exc).__name__)
            raise connection_error(exc, answered=answered) from exc
        finally:
            response.release()

    async def _events(self, response: aiohttp.ClientResponse) -> AsyncIterator[str]:
        parser = SSEParser()
        async for line in iter_lines(response.content, self.settings.idle_timeout):
            data = parser.feed(line)
            if data is None:
                continue
            if data.strip() == "[DONE]":
                return
            yield _event_text(data)
        data = parser.flush()
        if data is not None and data.strip() != "[DONE]":
            yield _event_text(data)

    async def _json(self, response: aiohttp.ClientResponse) -> AsyncIterator[str]:
        body = await read_with_idle_timeout(response.read(), self.settings.idle_timeout)
        try:
            data = json.loads(body)
        except ValueError:
            raise AgentError("The agent's answer could not be read (invalid JSON).") from None
        text = _field(data, _JSON_FIELDS)
        if text is None:
            raise AgentError('The agent\'s answer has no "text" or "answer" field.')
        yield text


def _event_text(data: str) -> str:
    try:
        parsed = json.loads(data)
    except ValueError:
        return data
    text = _field(parsed, _SSE_FIELDS)
    return data if text is None else text
