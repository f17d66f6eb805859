"""The agent contract: what every agent must do, checked through the core's ``stream_answer``.

Each case builds its agent the way the gateway does: the class from its entry point, the settings
from a plain dict through the config schema.  Cases needing a server get a real local one
(``gateway_testkit.llm_server``).  Agents whose module is not installed are left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import pytest

from gateway.agent import Agent, AgentRequest, HistoryTurn, stream_answer
from gateway.config.schema import Problems, structure
from gateway.errors import AgentError
from gateway.models import ConversationKind
from gateway.plugins import PluginRegistry
from gateway_testkit.llm_server import AgentHttpServer, LLMServer

REGISTRY = PluginRegistry.discover()
LIMIT = 15.0
HISTORY = (HistoryTurn("first question", "first answer"), HistoryTurn("second é", "answer 2"))

ECHO_STDIN = "import sys; sys.stdout.write(sys.stdin.read())"
PRINT_HISTORY = "import os, sys; sys.stdout.write(os.environ['GATEWAY_HISTORY'])"
FAIL = "import sys; sys.stderr.write('scripted failure'); sys.exit(3)"


@attrs.define
class AgentCase:
    """One agent type: how to configure it to echo, to fail, and to reveal the history it got."""

    type: str
    settings: dict[str, Any]
    failing: dict[str, Any] | None = None
    history_settings: dict[str, Any] | None = None
    # Given the answer of the history agent, the (question, answer) pairs the agent received.
    seen_history: Callable[[str], list[tuple[str, str]]] | None = None


Builder = Callable[[contextlib.AsyncExitStack], Awaitable[AgentCase]]


async def _echo(stack: contextlib.AsyncExitStack) -> AgentCase:
    return AgentCase("echo", {"delay": 0.01})


async def _openai(stack: contextlib.AsyncExitStack) -> AgentCase:
    server = await stack.enter_async_context(LLMServer())
    server.delay = 0.01
    broken = await stack.enter_async_context(LLMServer())
    broken.status = 500

    def seen(_answer: str) -> list[tuple[str, str]]:
        messages = server.messages()
        assert messages[-1] == {"role": "user", "content": "and now?"}
        pairs = zip(messages[:-1:2], messages[1:-1:2], strict=True)
        return [(q["content"], a["content"]) for q, a in pairs]

    settings = {"base_url": server.base_url, "model": "echo-model", "api_key": "sk-contract"}
    return AgentCase(
        "openai",
        settings,
        failing={"base_url": broken.base_url, "model": "echo-model"},
        history_settings=settings,
        seen_history=seen,
    )


async def _http(stack: contextlib.AsyncExitStack) -> AgentCase:
    server = await stack.enter_async_context(AgentHttpServer("sse"))
    server.delay = 0.01
    broken = await stack.enter_async_context(AgentHttpServer("text"))
    broken.status = 502

    def seen(_answer: str) -> list[tuple[str, str]]:
        body = server.requests[-1].body
        return [(turn["question"], turn["answer"]) for turn in body["history"]]

    return AgentCase(
        "http",
        {"url": server.url, "token": "contract-token"},
        failing={"url": broken.url},
        history_settings={"url": server.url},
        seen_history=seen,
    )


async def _command(stack: contextlib.AsyncExitStack) -> AgentCase:
    def seen(answer: str) -> list[tuple[str, str]]:
        return [(turn["question"], turn["answer"]) for turn in json.loads(answer)]

    return AgentCase(
        "command",
        {"argv": [sys.executable, "-c", ECHO_STDIN], "timeout": LIMIT},
        failing={"argv": [sys.executable, "-c", FAIL]},
        history_settings={"argv": [sys.executable, "-c", PRINT_HISTORY]},
        seen_history=seen,
    )


async def _python(stack: contextlib.AsyncExitStack) -> AgentCase:
    def seen(answer: str) -> list[tuple[str, str]]:
        return [(turn["question"], turn["answer"]) for turn in json.loads(answer)]

    return AgentCase(
        "python",
        {"callable": "gateway_testkit.python_agents:async_gen"},
        failing={"callable": "gateway_testkit.python_agents:raises"},
        history_settings={"callable": "gateway_testkit.python_agents:show_history"},
        seen_history=seen,
    )


CASES: dict[str, Builder] = {
    "echo": _echo,
    "openai": _openai,
    "http": _http,
    "command": _command,
    "python": _python,
}
# The echo agent cannot fail and does not show what history it got: it is left out of those two
# tests by construction rather than skipped.
FAILING = sorted(name for name in CASES if name != "echo")
SHOWING_HISTORY = sorted(name for name in CASES if name != "echo")


@pytest.fixture(params=sorted(CASES))
async def case(request: pytest.FixtureRequest) -> AsyncIterator[AgentCase]:
    async with contextlib.AsyncExitStack() as stack:
        yield await CASES[request.param](stack)


@pytest.fixture
async def build() -> AsyncIterator[Callable[[str, dict[str, Any]], Agent]]:
    made: list[Agent] = []

    def make(name: str, settings: dict[str, Any]) -> Agent:
        cls = REGISTRY.agent(name)
        problems: Problems = []
        parsed = structure(cls.settings_class, settings, "agent", problems)
        assert not problems, problems
        agent = cls(parsed)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        await agent.close()


def make_request(text: str = "hello world", **changes: Any) -> AgentRequest:
    fields: dict[str, Any] = {
        "instance": "contract",
        "session_key": "session-1",
        "text": text,
        "sender_id": "u-1",
        "sender_name": "Ann",
        "conversation_id": "conv-1",
        "conversation_kind": ConversationKind.SINGLE,
        "message_id": "msg-1",
    }
    fields.update(changes)
    return AgentRequest(**fields)


async def collect(agent: Agent, request: AgentRequest) -> list[Any]:
    async with asyncio.timeout(LIMIT * 2):
        return [c async for c in stream_answer(agent, request, timeout=LIMIT, idle_timeout=LIMIT)]


async def test_answer_streams_text(case: AgentCase, build: Any) -> None:
    agent = build(case.type, case.settings)
    chunks = await collect(agent, make_request("hello world"))
    assert chunks
    assert all(isinstance(chunk, str) for chunk in chunks)
    assert "hello world" in "".join(chunks)


async def test_concurrent_requests_do_not_mix(case: AgentCase, build: Any) -> None:
    agent = build(case.type, case.settings)
    texts = [f"message{i} from sender{i}" for i in range(5)]
    answers = await asyncio.gather(
        *(
            collect(agent, make_request(text, message_id=f"m{i}", sender_id=f"u{i}"))
            for i, text in enumerate(texts)
        )
    )
    for i, chunks in enumerate(answers):
        answer = "".join(chunks)
        assert texts[i] in answer
        assert not any(f"message{j} " in answer for j in range(5) if j != i)


async def test_close_is_idempotent(case: AgentCase, build: Any) -> None:
    unused = build(case.type, case.settings)
    await unused.close()
    await unused.close()
    used = build(case.type, case.settings)
    assert "hello world" in "".join(await collect(used, make_request()))
    await used.close()
    await used.close()


@pytest.mark.parametrize("name", FAILING)
async def test_failure_is_a_readable_agent_error(name: str, build: Any) -> None:
    async with contextlib.AsyncExitStack() as stack:
        case = await CASES[name](stack)
        assert case.failing is not None
        await _failure_is_readable(build(case.type, case.failing))


async def _failure_is_readable(agent: Agent) -> None:
    with pytest.raises(AgentError) as caught:
        await collect(agent, make_request())
    message = str(caught.value)
    assert message.strip()
    assert "Traceback" not in message


@pytest.mark.parametrize("name", SHOWING_HISTORY)
async def test_history_reaches_the_agent(name: str, build: Any) -> None:
    async with contextlib.AsyncExitStack() as stack:
        case = await CASES[name](stack)
        assert case.history_settings is not None and case.seen_history is not None
        agent = build(case.type, case.history_settings)
        chunks = await collect(agent, make_request("and now?", history=HISTORY))
        assert case.seen_history("".join(chunks)) == [(t.question, t.answer) for t in HISTORY]
