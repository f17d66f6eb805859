"""The HTTP agents: ``openai`` (OpenAI-compatible streaming) and ``http`` (your own endpoint).

Every test talks to a real local server (``gateway_testkit.llm_server``) over loopback; every wait is
bounded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.agent import Agent, AgentRequest, stream_answer
from gateway.agents.http import HttpAgent, HttpAgentSettings
from gateway.agents.openai import OpenAIAgent, OpenAIAgentSettings
from gateway.config.schema import Problems, structure
from gateway.errors import AgentError, AgentTimeout
from gateway.models import Attachment
from gateway_testkit.llm_server import AgentHttpServer, LLMServer
from gateway_testkit.requests import agent_request, agent_settings

LIMIT = 10.0
API_KEY = "sk-test-very-secret-key-4711"


make_request = agent_request
settings_of = agent_settings


def problems_of(cls: type[Any], data: dict[str, Any]) -> Problems:
    problems: Problems = []
    assert structure(cls, data, "agent", problems) is None
    return problems


@pytest.fixture
async def llm() -> AsyncIterator[LLMServer]:
    async with LLMServer() as server:
        yield server


@pytest.fixture
async def endpoint() -> AsyncIterator[AgentHttpServer]:
    async with AgentHttpServer() as server:
        yield server


@pytest.fixture
async def agents() -> AsyncIterator[list[Agent]]:
    """Agents made by a test, closed at its end."""
    made: list[Agent] = []
    yield made
    for agent in made:
        await agent.close()


@pytest.fixture
def openai_agent(llm: LLMServer, agents: list[Agent]) -> Any:
    def make(**settings: Any) -> OpenAIAgent:
        data = {"base_url": llm.base_url, "model": "test-model", **settings}
        agent = OpenAIAgent(settings_of(OpenAIAgentSettings, data))
        agents.append(agent)
        return agent

    return make


@pytest.fixture
def http_agent(endpoint: AgentHttpServer, agents: list[Agent]) -> Any:
    def make(**settings: Any) -> HttpAgent:
        agent = HttpAgent(settings_of(HttpAgentSettings, {"url": endpoint.url, **settings}))
        agents.append(agent)
        return agent

    return make


async def answer(
    agent: Agent, request: AgentRequest | None = None, *, idle: float = LIMIT
) -> tuple[list[str], AgentError | None]:
    """The chunks streamed and the error raised (if any), through the core's ``stream_answer``."""
    chunks: list[str] = []
    try:
        async with asyncio.timeout(LIMIT * 2):
            async for chunk in stream_answer(
                agent, request or make_request(), timeout=LIMIT, idle_timeout=idle
            ):
                chunks.append(chunk)
    except AgentError as exc:
        return chunks, exc
    return chunks, None


# --- openai ------------------------------------------------------------------------------------


async def test_openai_streams_chunks_as_they_arrive(llm: LLMServer, openai_agent: Any) -> None:
    llm.chunks = ["one ", "two ", "three"]
    llm.hold_last = asyncio.Event()
    chunks = stream_answer(openai_agent(), make_request(), timeout=LIMIT, idle_timeout=LIMIT)
    first = await asyncio.wait_for(anext(chunks), LIMIT)
    assert first == "one "
    assert "three" not in llm.sent  # the first chunk arrived before the last was sent
    llm.hold_last.set()
    rest = [chunk async for chunk in chunks]
    assert first + "".join(rest) == "one two three"


async def test_openai_request_carries_prompt_history_and_parameters(
    llm: LLMServer, openai_agent: Any
) -> None:
    agent = openai_agent(system_prompt="Be brief.", temperature=0.2, max_tokens=50)
    chunks, error = await answer(agent, make_request("hello there"))
    assert error is None
    assert "".join(chunks) == "hello there"
    sent = llm.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["model"] == "test-model"
    assert sent.body["stream"] is True
    assert sent.body["temperature"] == 0.2
    assert sent.body["max_tokens"] == 50
    assert sent.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2 é"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "hello there"},
    ]
    assert "Authorization" not in sent.headers  # no key: nothing sent (Ollama, vLLM)


async def test_openai_defaults_omit_optional_parameters(llm: LLMServer, openai_agent: Any) -> None:
    _, error = await answer(openai_agent(), make_request("hi", history=()))
    assert error is None
    body = llm.requests[0].body
    assert "temperature" not in body and "max_tokens" not in body
    assert body["messages"] == [{"role": "user", "content": "hi"}]


async def test_openai_sends_key_and_extra_headers(llm: LLMServer, openai_agent: Any) -> None:
    agent = openai_agent(api_key=API_KEY, extra_headers=["X-Team: bots", "OpenAI-Project: p1"])
    _, error = await answer(agent)
    assert error is None
    headers = llm.requests[0].headers
    assert headers["Authorization"] == f"Bearer {API_KEY}"
    assert headers["X-Team"] == "bots"
    assert headers["OpenAI-Project"] == "p1"


async def test_openai_slow_chunks_within_idle_timeout(llm: LLMServer, openai_agent: Any) -> None:
    llm.delay = 0.2
    chunks, error = await answer(openai_agent(idle_timeout=2.0), idle=2.0)
    assert error is None
    assert chunks == ["hello ", "world"]


@pytest.mark.parametrize("where", ["agent", "core"])
async def test_openai_idle_timeout(llm: LLMServer, openai_agent: Any, where: str) -> None:
    llm.chunks = ["first ", "late"]
    llm.delay = 0.3
    llm.hold_last = asyncio.Event()  # the last chunk never comes
    agent = openai_agent(idle_timeout=0.5 if where == "agent" else LIMIT)
    chunks, error = await answer(agent, idle=0.5 if where == "core" else LIMIT)
    assert chunks == ["first "]
    assert isinstance(error, AgentTimeout)
    assert "0.5 s" in str(error)


async def test_openai_request_timeout(llm: LLMServer, openai_agent: Any) -> None:
    llm.header_delay = 2.0
    chunks, error = await answer(openai_agent(request_timeout=0.3))
    assert chunks == []
    assert isinstance(error, AgentTimeout)
    assert str(error) == "The agent did not respond in time."


async def test_openai_disconnect_midway_keeps_partial_text(
    llm: LLMServer, openai_agent: Any
) -> None:
    llm.chunks = ["one ", "two ", "three ", "four"]
    llm.disconnect_after = 2
    chunks, error = await answer(openai_agent())
    assert "".join(chunks) == "one two "
    assert error is not None and str(error) == "The agent's answer was cut off."


async def test_openai_disconnect_before_content(llm: LLMServer, openai_agent: Any) -> None:
    llm.disconnect_after = 0
    chunks, error = await answer(openai_agent())
    assert chunks == []
    assert error is not None and str(error)
    assert "cut off" not in str(error)


async def test_openai_stream_without_done_is_accepted(llm: LLMServer, openai_agent: Any) -> None:
    llm.send_done = False
    chunks, error = await answer(openai_agent())
    assert error is None
    assert "".join(chunks) == "hello world"


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (401, "The agent's API key was rejected."),
        (403, "The agent's API key was rejected."),
        (404, "The agent's model or URL was not found."),
        (400, "The agent failed (HTTP 400)."),
        (500, "The agent failed (HTTP 500)."),
        (503, "The agent failed (HTTP 503)."),
    ],
)
async def test_openai_http_errors(
    llm: LLMServer, openai_agent: Any, status: int, message: str
) -> None:
    llm.status = status
    chunks, error = await answer(openai_agent())
    assert chunks == []
    assert error is not None and str(error) == message
    assert len(llm.requests) == 1  # only 429 is retried


async def test_openai_429_retried_then_success(llm: LLMServer, openai_agent: Any) -> None:
    llm.fail_first = 2
    llm.retry_after = "0"
    chunks, error = await answer(openai_agent(max_retries=3))
    assert error is None
    assert "".join(chunks) == "hello world"
    assert len(llm.requests) == 3


async def test_openai_429_respects_retry_after(llm: LLMServer, openai_agent: Any) -> None:
    llm.fail_first = 1
    llm.retry_after = "0.4"
    loop = asyncio.get_running_loop()
    started = loop.time()
    _, error = await answer(openai_agent())
    assert error is None
    assert loop.time() - started >= 0.35
    assert len(llm.requests) == 2


async def test_openai_429_backoff_without_retry_after(llm: LLMServer, openai_agent: Any) -> None:
    llm.fail_first = 2
    agent = openai_agent()
    agent.backoff_base = 0.01
    _, error = await answer(agent)
    assert error is None
    assert len(llm.requests) == 3


async def test_openai_429_exhausted(llm: LLMServer, openai_agent: Any) -> None:
    llm.status = 429
    llm.fail_status = 429
    llm.retry_after = "0"
    chunks, error = await answer(openai_agent(max_retries=2))
    assert chunks == []
    assert error is not None
    assert str(error) == "The agent is busy right now; please try again later."
    assert len(llm.requests) == 3


async def test_openai_malformed_lines_skipped(llm: LLMServer, openai_agent: Any) -> None:
    llm.malformed = True
    chunks, error = await answer(openai_agent())
    assert error is None
    assert "".join(chunks) == "hello world"


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_openai_reasoning_dropped_by_default(
    llm: LLMServer, openai_agent: Any, field: str
) -> None:
    llm.reasoning = ["Let me ", "think."]
    llm.reasoning_field = field
    chunks, error = await answer(openai_agent())
    assert error is None
    assert "".join(chunks) == "hello world"


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_openai_reasoning_shown(llm: LLMServer, openai_agent: Any, field: str) -> None:
    llm.reasoning = ["Let me ", "think.\nStep two."]
    llm.reasoning_field = field
    chunks, error = await answer(openai_agent(show_reasoning=True))
    assert error is None
    assert "".join(chunks) == "> Let me think.\n> Step two.\n\nhello world"


async def test_openai_non_streaming_server(llm: LLMServer, openai_agent: Any) -> None:
    llm.json_response = True
    chunks, error = await answer(openai_agent())
    assert error is None
    assert "".join(chunks) == "hello world"


async def test_openai_connection_refused(openai_agent: Any, agents: list[Agent]) -> None:
    async with LLMServer() as gone:
        url = gone.base_url
    agent = OpenAIAgent(settings_of(OpenAIAgentSettings, {"base_url": url, "model": "m"}))
    agents.append(agent)
    chunks, error = await answer(agent)
    assert chunks == []
    assert error is not None and str(error) == "Could not connect to the agent."


async def test_openai_api_key_never_logged_or_shown(
    llm: LLMServer, openai_agent: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    agent = openai_agent(api_key=API_KEY, max_retries=1)
    errors: list[AgentError] = []
    for status in (401, 429, 500):
        llm.status = status
        llm.fail_status = status
        llm.retry_after = "0"
        _, error = await answer(agent)
        assert error is not None
        errors.append(error)
    llm.status = 200
    llm.disconnect_after = 1
    _, error = await answer(agent)
    assert error is not None
    errors.append(error)
    for error in errors:
        assert API_KEY not in str(error) and API_KEY not in repr(error)
        assert API_KEY not in str(error.__cause__ or "")
    assert API_KEY not in caplog.text
    assert API_KEY not in repr(agent.settings)
    assert llm.requests[0].headers["Authorization"] == f"Bearer {API_KEY}"


async def test_openai_close_is_idempotent_and_session_reopens(
    llm: LLMServer, openai_agent: Any
) -> None:
    agent = openai_agent()
    await agent.close()  # never used
    assert (await answer(agent))[1] is None
    await agent.close()
    await agent.close()
    chunks, error = await answer(agent)
    assert error is None and "".join(chunks) == "hello world"


def test_openai_settings_validation() -> None:
    problems = dict(problems_of(OpenAIAgentSettings, {}))
    assert "agent.model" in problems
    problems = dict(
        problems_of(
            OpenAIAgentSettings,
            {
                "model": "m",
                "base_url": "ftp://x",
                "extra_headers": ["no colon here"],
                "max_retries": -1,
                "request_timeout": 0,
            },
        )
    )
    assert set(problems) == {
        "agent.base_url",
        "agent.extra_headers",
        "agent.max_retries",
        "agent.request_timeout",
    }
    settings = settings_of(OpenAIAgentSettings, {"model": "m", "api_key": API_KEY})
    assert settings.base_url == "https://api.openai.com/v1"
    assert settings.max_retries == 3
    assert settings.temperature is None and settings.max_tokens is None
    assert settings.show_reasoning is False


# --- http --------------------------------------------------------------------------------------


async def test_http_posts_the_message_as_json(endpoint: AgentHttpServer, http_agent: Any) -> None:
    request = make_request(
        "hi there",
        attachments=(Attachment(kind="image", name="cat.png", url="https://x/cat.png"),),
    )
    chunks, error = await answer(http_agent(), request)
    assert error is None
    assert "".join(chunks) == "hi there"
    sent = endpoint.requests[0]
    assert sent.headers["Content-Type"].startswith("application/json")
    assert "Authorization" not in sent.headers
    assert sent.body == {
        "text": "hi there",
        "sender_id": "u-1",
        "sender_name": "Ann Ö",
        "conversation_id": "conv-1",
        "conversation_kind": "group",
        "session_key": "session-1",
        "message_id": "msg-1",
        "instance": "inst-1",
        "history": [{"question": "q1", "answer": "a1"}, {"question": "q2 é", "answer": "a2"}],
        "attachments": [{"kind": "image", "name": "cat.png", "url": "https://x/cat.png"}],
    }


async def test_http_sends_token_and_headers(endpoint: AgentHttpServer, http_agent: Any) -> None:
    agent = http_agent(token=API_KEY, headers=["X-App: demo", "X-Tenant: t 1"])
    _, error = await answer(agent)
    assert error is None
    headers = endpoint.requests[0].headers
    assert headers["Authorization"] == f"Bearer {API_KEY}"
    assert headers["X-App"] == "demo"
    assert headers["X-Tenant"] == "t 1"


@pytest.mark.parametrize("mode", ["sse", "sse-raw", "text"])
async def test_http_streams_incrementally(
    endpoint: AgentHttpServer, http_agent: Any, mode: str
) -> None:
    endpoint.mode = mode
    endpoint.chunks = ["héllo ", "wörld ", "你好"]
    endpoint.hold_last = asyncio.Event()
    chunks = stream_answer(http_agent(), make_request(), timeout=LIMIT, idle_timeout=LIMIT)
    first = await asyncio.wait_for(anext(chunks), LIMIT)
    assert first.startswith("héllo ")  # plain text pieces may arrive coalesced
    assert "你好" not in endpoint.sent and "你好" not in first
    endpoint.hold_last.set()
    rest = [chunk async for chunk in chunks]
    assert first + "".join(rest) == "héllo wörld 你好"


async def test_http_sse_json_fields(endpoint: AgentHttpServer, http_agent: Any) -> None:
    endpoint.mode = "sse-raw"
    endpoint.chunks = [
        '{"text": "a "}',
        '{"content": "b "}',
        '{"delta": "c "}',
        '{"other": 1}',
        " plain",
    ]
    chunks, error = await answer(http_agent())
    assert error is None
    assert chunks == ["a ", "b ", "c ", '{"other": 1}', " plain"]


@pytest.mark.parametrize("field", ["answer", "text"])
async def test_http_json_response(endpoint: AgentHttpServer, http_agent: Any, field: str) -> None:
    endpoint.mode = "json"
    endpoint.json_field = field
    chunks, error = await answer(http_agent())
    assert error is None
    assert "".join(chunks) == "hello world"


async def test_http_json_without_answer_field(endpoint: AgentHttpServer, http_agent: Any) -> None:
    endpoint.mode = "json"
    endpoint.json_field = "result"
    _, error = await answer(http_agent())
    assert error is not None and "answer" in str(error)


@pytest.mark.parametrize("status", [401, 404, 500, 502])
async def test_http_non_2xx(endpoint: AgentHttpServer, http_agent: Any, status: int) -> None:
    endpoint.status = status
    chunks, error = await answer(http_agent(token=API_KEY))
    assert chunks == []
    assert error is not None and str(error) == f"The agent failed (HTTP {status})."


@pytest.mark.parametrize("mode", ["sse", "text"])
async def test_http_disconnect_midway(
    endpoint: AgentHttpServer, http_agent: Any, mode: str
) -> None:
    endpoint.mode = mode
    endpoint.chunks = ["one ", "two ", "three"]
    endpoint.disconnect_after = 2
    chunks, error = await answer(http_agent())
    assert "".join(chunks) == "one two "
    assert error is not None and str(error) == "The agent's answer was cut off."


@pytest.mark.parametrize("mode", ["sse", "text"])
async def test_http_idle_timeout(endpoint: AgentHttpServer, http_agent: Any, mode: str) -> None:
    endpoint.mode = mode
    endpoint.chunks = ["first ", "never"]
    endpoint.hold_last = asyncio.Event()
    chunks, error = await answer(http_agent(idle_timeout=0.4))
    assert chunks == ["first "]
    assert isinstance(error, AgentTimeout)


async def test_http_slow_chunks_within_idle_timeout(
    endpoint: AgentHttpServer, http_agent: Any
) -> None:
    endpoint.delay = 0.2
    chunks, error = await answer(http_agent(idle_timeout=2.0), idle=2.0)
    assert error is None
    assert chunks == ["hello ", "world"]


async def test_http_token_never_logged(
    endpoint: AgentHttpServer, http_agent: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    endpoint.status = 403
    _, error = await answer(http_agent(token=API_KEY))
    assert error is not None and API_KEY not in str(error)
    assert API_KEY not in caplog.text


def test_http_settings_validation() -> None:
    assert "agent.url" in dict(problems_of(HttpAgentSettings, {}))
    problems = dict(problems_of(HttpAgentSettings, {"url": "example.com", "headers": ["X"]}))
    assert set(problems) == {"agent.url", "agent.headers"}
