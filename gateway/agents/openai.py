"""The openai agent: any OpenAI-compatible chat completions API, streamed (OpenAI, Azure-style
gateways, DeepSeek, Qwen/DashScope, Ollama, vLLM, LM Studio...).

``POST {base_url}/chat/completions`` with ``"stream": true``; the answer arrives as server-sent events
(``data: {json}`` lines ending with ``data: [DONE]``) and each ``choices[0].delta.content`` is passed
on as it arrives.  The messages are the system prompt, the session's earlier turns (user/assistant
pairs) and the new message.  HTTP 429 is retried with exponential backoff (``Retry-After`` is
respected); every other failure becomes an :class:`~gateway.errors.AgentError` with a readable text.
The API key is only ever put in the ``Authorization`` header; it is never logged.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import time
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
)
from gateway.errors import AgentError
from gateway.secrets import Secret

__all__ = ["OpenAIAgent", "OpenAIAgentSettings"]

log = logging.getLogger(__name__)

_RETRY_AFTER_MAX = 60.0  # seconds; a longer Retry-After is capped
_BACKOFF_MAX = 30.0


def _check_url(_instance: Any, _attribute: Any, value: str) -> None:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")


@attrs.frozen
class OpenAIAgentSettings:
    model: str = attrs.field(
        validator=attrs.validators.min_len(1),
        metadata={"help": 'the model name, e.g. "gpt-4o-mini", "deepseek-chat", "qwen2.5:7b"'},
    )
    base_url: str = attrs.field(
        default="https://api.openai.com/v1",
        validator=_check_url,
        metadata={"help": "the API's base URL; /chat/completions is appended"},
    )
    api_key: Secret = attrs.field(
        default=Secret(""),
        metadata={"help": "the API key (empty: no Authorization header, e.g. for Ollama/vLLM)"},
    )
    system_prompt: str = attrs.field(
        default="", metadata={"help": "the system message put before the conversation"}
    )
    temperature: float | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.ge(0)),
        metadata={"help": "sampling temperature (unset: the API's default)"},
    )
    max_tokens: int | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.gt(0)),
        metadata={"help": "maximum tokens of the answer (unset: the API's default)"},
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
    extra_headers: list[str] = attrs.field(
        factory=list,
        validator=check_header_lines,
        metadata={"help": 'additional HTTP headers, each "Name: value"'},
    )
    show_reasoning: bool = attrs.field(
        default=False,
        metadata={
            "help": "show the model's reasoning (reasoning_content) before the answer, quoted "
            'with "> "; by default it is dropped'
        },
    )
    max_retries: int = attrs.field(
        default=3,
        validator=attrs.validators.ge(0),
        metadata={"help": "how often a rate-limited request (HTTP 429) is retried"},
    )


def _status_error(status: int) -> AgentError:
    if status in (401, 403):
        return AgentError("The agent's API key was rejected.")
    if status == 404:
        return AgentError("The agent's model or URL was not found.")
    if status == 429:
        return AgentError("The agent is busy right now; please try again later.")
    return AgentError(f"The agent failed (HTTP {status}).")


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (seconds or an HTTP date), capped; None if absent."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), _RETRY_AFTER_MAX)


class OpenAIAgent(HttpSessionAgent):
    title = "OpenAI-compatible API"
    description = "Streams answers from any OpenAI-compatible chat completions API."
    settings_class = OpenAIAgentSettings

    settings: OpenAIAgentSettings

    backoff_base = 1.0  # seconds before the first retry of a 429 without Retry-After; then doubled

    def messages(self, request: AgentRequest) -> list[dict[str, str]]:
        messages: list[dict[str, str]] = []
        if self.settings.system_prompt:
            messages.append({"role": "system", "content": self.settings.system_prompt})
        for turn in request.history:
            messages.append({"role": "user", "content": turn.question})
            messages.append({"role": "assistant", "content": turn.answer})
        messages.append({"role": "user", "content": request.text})
        return messages

    def _payload(self, request: AgentRequest) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.settings.model,
            "messages": self.messages(request),
            "stream": True,
        }
        if self.settings.temperature is not None:
            payload["temperature"] = self.settings.temperature
        if self.settings.max_tokens is not None:
            payload["max_tokens"] = self.settings.max_tokens
        return payload

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        headers.update(header_lines(self.settings.extra_headers))
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key.reveal()}"
        return headers

    async def _open(self, request: AgentRequest) -> aiohttp.ClientResponse:
        """Send the request, retrying 429s; return a 2xx response (the caller releases it)."""
        url = self.settings.base_url.rstrip("/") + "/chat/completions"
        payload = self._payload(request)
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(self.settings.request_timeout):
                    response = await self._client().post(url, json=payload, headers=self._headers())
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.debug("request to the agent failed: %s", type(exc).__name__)
                raise connection_error(exc, answered=False) from exc
            if 200 <= response.status < 300:
                return response
            status = response.status
            retry_after = _retry_after(response.headers.get("Retry-After"))
            response.release()
            if status == 429 and attempt < self.settings.max_retries:
                delay = (
                    retry_after
                    if retry_after is not None
                    else min(self.backoff_base * 2**attempt, _BACKOFF_MAX)
                )
                attempt += 1
                log.info(
                    "the agent's API is rate limited (HTTP 429); retry %d of %d in %.1f s",
                    attempt,
                    self.settings.max_retries,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            log.debug("the agent's API answered HTTP %d", status)
            raise _status_error(status)

    async def stream(self, request: AgentRequest) -> AsyncIterator[str]:
        response = await self._open(request)
        try:
            if response.content_type == "application/json":
                # A server that ignored "stream": the whole answer in one body.
                async for chunk in self._whole(response):
                    yield chunk
                return
            async for chunk in self._events(response):
                yield chunk
        finally:
            response.release()

    async def _whole(self, response: aiohttp.ClientResponse) -> AsyncIterator[str]:
        try:
            async with asyncio.timeout(self.settings.idle_timeout):
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise connection_error(exc, answered=False) from exc
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, LookupError, TypeError):
            raise AgentError("The agent's answer could not be read.") from None
        if isinstance(content, str) and content:
            yield content

    async def _events(self, response: aiohttp.ClientResponse) -> AsyncIterator[str]:
        parser = SSEParser()
        shower = _ReasoningShower(self.settings.show_reasoning)
        answered = False
        try:
            async for line in iter_lines(response.content, self.settings.idle_timeout):
                data = parser.feed(line)
                if data is None:
                    continue
                if data.strip() == "[DONE]":
                    return
                for chunk in shower.chunks(_deltas(data)):
                    answered = True
                    yield chunk
            data = parser.flush()
            if data is not None and data.strip() != "[DONE]":
                for chunk in shower.chunks(_deltas(data)):
                    yield chunk
            # The stream ended cleanly without [DONE]: accept what came.
        except (aiohttp.ClientError, OSError) as exc:
            log.debug("the agent's stream failed: %s", type(exc).__name__)
            raise connection_error(exc, answered=answered) from exc


def _deltas(data: str) -> list[tuple[str, str]]:
    """``(kind, text)`` pieces of one event, kind "reasoning" or "content"; malformed: none."""
    try:
        event = json.loads(data)
    except ValueError:
        log.debug("skipping a malformed event from the agent: %.200r", data)
        return []
    if not isinstance(event, dict):
        log.debug("skipping a malformed event from the agent: %.200r", data)
        return []
    error = event.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else error
        detail = f": {str(message)[:300]}" if message else "."
        raise AgentError(f"The agent reported an error{detail}")
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return []  # e.g. a final usage-only event
    delta = choices[0].get("delta")
    if not isinstance(delta, dict):
        return []
    pieces: list[tuple[str, str]] = []
    for key in ("reasoning_content", "reasoning"):
        reasoning = delta.get(key)
        if isinstance(reasoning, str) and reasoning:
            pieces.append(("reasoning", reasoning))
            break
    content = delta.get("content")
    if isinstance(content, str) and content:
        pieces.append(("content", content))
    return pieces


class _ReasoningShower:
    """Drops reasoning, or quotes it (``> `` at each line start) and separates it from the answer."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.in_reasoning = False
        self.line_start = True

    def chunks(self, pieces: list[tuple[str, str]]) -> list[str]:
        out: list[str] = []
        for kind, text in pieces:
            if kind == "reasoning":
                if not self.show:
                    continue
                self.in_reasoning = True
                quoted = text.replace("\n", "\n> ")
                if self.line_start:
                    quoted = "> " + quoted
                if quoted.endswith("\n> "):
                    quoted = quoted[:-2]
                    self.line_start = True
                else:
                    self.line_start = False
                out.append(quoted)
            else:
                if self.in_reasoning:
                    self.in_reasoning = False
                    text = ("\n" if self.line_start else "\n\n") + text
                out.append(text)
        return out
