"""The local agents: ``command`` (a program per message) and ``python`` (a callable of your own).

Programs are small scripts run with ``sys.executable``; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.agent import AgentRequest, HistoryTurn
from gateway.agents.command import CommandAgent, CommandAgentSettings
from gateway.agents.python import PythonAgent, PythonAgentSettings, from_stream_callback
from gateway.config.schema import Problems, structure
from gateway.errors import AgentError, AgentTimeout
from gateway_testkit import python_agents
from gateway_testkit.requests import agent_request, agent_settings

LIMIT = 15.0  # seconds any single test interaction may take


def make_request(text: str = "hello", **changes: Any) -> AgentRequest:
    return agent_request(text, **changes)


settings_of = agent_settings


def command(script: str, **settings: Any) -> CommandAgent:
    data = {"argv": [sys.executable, "-c", script], **settings}
    return CommandAgent(settings_of(CommandAgentSettings, data))


def python_agent(name: str) -> PythonAgent:
    return PythonAgent(
        settings_of(PythonAgentSettings, {"callable": f"gateway_testkit.python_agents:{name}"})
    )


async def collect(chunks: AsyncIterator[str]) -> list[str]:
    async with asyncio.timeout(LIMIT):
        return [chunk async for chunk in chunks]


async def collect_until_error(chunks: AsyncIterator[str]) -> tuple[list[str], AgentError]:
    received: list[str] = []
    async with asyncio.timeout(LIMIT):
        with pytest.raises(AgentError) as info:
            async for chunk in chunks:
                received.append(chunk)
    return received, info.value


def is_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


async def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_gone(pid):
            return True
        await asyncio.sleep(0.05)
    return is_gone(pid)


def reaped(pid: int) -> bool:
    """True when our own child ``pid`` was reaped (a zombie of ours would still answer kill 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# A program that starts a grandchild (`sleep 30`), prints both pids, then hangs.
SPAWNS_GRANDCHILD = """
import os, subprocess, sys, time
child = subprocess.Popen(["sleep", "30"])
sys.stdout.write(f"{os.getpid()} {child.pid}\\n")
sys.stdout.flush()
time.sleep(30)
"""


# --- command agent ------------------------------------------------------------------------------


async def test_command_gets_the_text_on_stdin_and_the_environment() -> None:
    script = """
import json, os, sys
data = sys.stdin.read()
env = {k: v for k, v in os.environ.items() if k.startswith("GATEWAY_")}
print(json.dumps({"stdin": data, "env": env, "path": "PATH" in os.environ}))
"""
    chunks = await collect(command(script).stream(make_request("héllo wörld")))
    result = json.loads("".join(chunks))
    assert result["stdin"] == "héllo wörld"
    assert result["path"]  # the gateway's environment is passed on
    assert result["env"] == {
        "GATEWAY_TEXT": "héllo wörld",
        "GATEWAY_SENDER_ID": "u-1",
        "GATEWAY_SENDER_NAME": "Ann Ö",
        "GATEWAY_CONVERSATION_ID": "conv-1",
        "GATEWAY_CONVERSATION_KIND": "group",
        "GATEWAY_SESSION_KEY": "session-1",
        "GATEWAY_MESSAGE_ID": "msg-1",
        "GATEWAY_INSTANCE": "inst-1",
        "GATEWAY_HISTORY": json.dumps(
            [{"question": "q1", "answer": "a1"}, {"question": "q2 é", "answer": "a2"}],
            ensure_ascii=False,
        ),
    }


async def test_command_env_input_leaves_stdin_empty() -> None:
    script = """
import os, sys
print(repr(sys.stdin.read()), os.environ["GATEWAY_TEXT"])
"""
    chunks = await collect(command(script, input="env").stream(make_request("from env")))
    assert "".join(chunks) == "'' from env\n"


async def test_command_that_ignores_a_large_stdin_does_not_hang() -> None:
    chunks = await collect(command("print('done')").stream(make_request("x" * 1_000_000)))
    assert "".join(chunks) == "done\n"


async def test_command_long_text_and_history_fit_in_the_environment() -> None:
    script = """
import json, os, sys
text = sys.stdin.read()
history = json.loads(os.environ["GATEWAY_HISTORY"])
print(len(text), len(os.environ["GATEWAY_TEXT"]), len(history), history[-1]["question"])
"""
    turns = tuple(HistoryTurn(f"q{i}", "a" * 20_000) for i in range(20))
    request = make_request("é" * 300_000, history=turns)
    chunks = await collect(command(script).stream(request))
    full, in_env, kept, last = "".join(chunks).split()
    assert int(full) == 300_000
    assert int(in_env) == 50_000  # 100 000 bytes of two-byte characters
    assert 0 < int(kept) < 20
    assert last == "q19"  # the newest turns are kept


async def test_command_output_is_streamed_as_it_arrives(tmp_path: Path) -> None:
    marker = tmp_path / "finished"
    script = f"""
import sys, time, pathlib
sys.stdout.write("first\\n")
sys.stdout.flush()
time.sleep(1.0)
pathlib.Path({str(marker)!r}).write_text("x")
print("second", flush=True)
"""
    chunks = command(script).stream(make_request())
    async with asyncio.timeout(LIMIT):
        first = await anext(chunks)
        assert first == "first\n"
        assert not marker.exists()  # the program was still running
        rest = [chunk async for chunk in chunks]
    assert "".join(rest) == "second\n"
    assert marker.exists()


async def test_command_utf8_split_across_reads() -> None:
    script = r"""
import sys, time
out = sys.stdout.buffer
for piece in (b"caf\xc3", b"\xa9 \xe4\xb8", b"\xad!"):
    out.write(piece)
    out.flush()
    time.sleep(0.2)
"""
    chunks = await collect(command(script).stream(make_request()))
    assert "".join(chunks) == "café 中!"
    assert len(chunks) >= 2  # it really arrived in pieces


async def test_command_non_zero_exit_reports_the_stderr_tail() -> None:
    script = """
import sys
sys.stdout.write("partial answer\\n")
sys.stdout.flush()
sys.stderr.write("x" * 5000 + "THE END")
sys.exit(3)
"""
    received, error = await collect_until_error(command(script).stream(make_request()))
    assert received == ["partial answer\n"]
    assert not isinstance(error, AgentTimeout)
    message = str(error)
    assert message.startswith("The agent program failed (exit 3): ")
    assert message.endswith("THE END")
    assert len(message) < 2200  # only the tail


async def test_command_that_cannot_start() -> None:
    agent = CommandAgent(settings_of(CommandAgentSettings, {"argv": ["/nonexistent/program"]}))
    _, error = await collect_until_error(agent.stream(make_request()))
    assert "could not be started" in str(error)


async def test_command_timeout_kills_the_process_group() -> None:
    agent = command(SPAWNS_GRANDCHILD, timeout=1.0)
    received, error = await collect_until_error(agent.stream(make_request()))
    assert isinstance(error, AgentTimeout)
    assert "1 s" in str(error)
    pid, grandchild = map(int, "".join(received).split())
    assert reaped(pid)
    assert await wait_gone(grandchild)


async def test_command_cancellation_kills_and_reaps() -> None:
    agent = command(SPAWNS_GRANDCHILD, timeout=60)
    first: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def consume() -> None:
        async for chunk in agent.stream(make_request()):
            if not first.done():
                first.set_result(chunk)

    task = asyncio.create_task(consume())
    async with asyncio.timeout(LIMIT):
        pid, grandchild = map(int, (await first).split())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert reaped(pid)
    assert await wait_gone(grandchild)


async def test_command_aclose_kills_and_reaps() -> None:
    chunks = command(SPAWNS_GRANDCHILD).stream(make_request())
    async with asyncio.timeout(LIMIT):
        pid, grandchild = map(int, (await anext(chunks)).split())
        await chunks.aclose()  # type: ignore[attr-defined]
    assert reaped(pid)
    assert await wait_gone(grandchild)


async def test_command_max_output_truncates_and_kills() -> None:
    script = """
import os, sys, time
sys.stdout.write(f"{os.getpid()}\\n" + "a" * 10000)
sys.stdout.flush()
time.sleep(30)
"""
    chunks = await collect(command(script, max_output=1000).stream(make_request()))
    text = "".join(chunks)
    pid_line, _, rest = text.partition("\n")
    body, _, note = rest.partition("\n\n")
    assert len(pid_line) + 1 + len(body) == 1000
    assert set(body) == {"a"}
    assert "truncated" in note
    assert reaped(int(pid_line))


def same_path(a: str, b: Path) -> bool:
    return Path(a).resolve() == b.resolve()


async def test_command_cwd(tmp_path: Path) -> None:
    agent = command("import os; print(os.getcwd())", cwd=str(tmp_path))
    chunks = await collect(agent.stream(make_request()))
    assert same_path("".join(chunks).strip(), tmp_path)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"argv": []}, "agent.argv"),
        ({"argv": [""]}, "agent.argv"),
        ({}, "agent.argv"),
        ({"argv": ["x"], "input": "file"}, "agent.input"),
        ({"argv": ["x"], "timeout": 0}, "agent.timeout"),
        ({"argv": ["x"], "max_output": 0}, "agent.max_output"),
    ],
)
def test_command_settings_validation(data: dict[str, Any], key: str) -> None:
    problems: Problems = []
    assert structure(CommandAgentSettings, data, "agent", problems) is None
    assert [k for k, _ in problems] == [key]


# --- python agent -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sync_str", "sync: hi"),
        ("sync_gen", "sync gen: hi"),
        ("async_str", "async: hi"),
        ("async_gen", "async gen: hi"),
        ("returns_list", "list hi"),
        ("returns_awaitable", "async: hi"),
        ("callable_object", "object: hi"),
    ],
)
async def test_python_agent_kinds(name: str, expected: str) -> None:
    chunks = await collect(python_agent(name).stream(make_request("hi")))
    assert "".join(chunks) == expected


async def test_python_agent_generators_stream_chunks() -> None:
    assert await collect(python_agent("sync_gen").stream(make_request("hi"))) == [
        "sync ",
        "gen: ",
        "hi",
    ]
    assert await collect(python_agent("async_gen").stream(make_request("hi"))) == [
        "async ",
        "gen: ",
        "hi",
    ]


async def test_python_agent_exception_becomes_agent_error() -> None:
    _, error = await collect_until_error(python_agent("raises").stream(make_request()))
    assert str(error) == "The agent failed while answering."
    assert isinstance(error.__cause__, RuntimeError)
    assert "boom" in str(error.__cause__)


async def test_python_agent_exception_after_partial_text() -> None:
    received, error = await collect_until_error(
        python_agent("raises_midway").stream(make_request())
    )
    assert received == ["partial "]
    assert str(error) == "The agent failed while answering."
    assert isinstance(error.__cause__, RuntimeError)


@pytest.mark.parametrize("name", ["returns_int", "yields_non_str"])
async def test_python_agent_non_str_is_an_error(name: str) -> None:
    _, error = await collect_until_error(python_agent(name).stream(make_request()))
    assert "not text" in str(error)


@pytest.mark.parametrize(
    ("reference", "words"),
    [
        ("no_such_module_for_tests:answer", ["cannot import", "no_such_module_for_tests"]),
        ("gateway_testkit.python_agents:missing", ["no attribute", "missing"]),
        ("gateway_testkit.python_agents:not_callable", ["not callable"]),
        ("just_a_module", ["package.module:attribute"]),
    ],
)
def test_python_agent_bad_callable_is_a_config_problem(reference: str, words: list[str]) -> None:
    problems: Problems = []
    assert structure(PythonAgentSettings, {"callable": reference}, "agent", problems) is None
    assert len(problems) == 1
    key, message = problems[0]
    assert key == "agent"
    assert reference in message
    for word in words:
        assert word in message


async def test_jitai_adapter_streams_chunks_in_order() -> None:
    jitai = python_agents.jitai_agent
    jitai.calls.clear()
    jitai.threads.clear()
    chunks = await collect(python_agent("jitai_answer").stream(make_request("question?")))
    assert chunks == [f"chunk{i} " for i in range(5)]
    params, chat_id = jitai.calls[0]
    assert params["question"] == "question?"
    assert params["history"][0] == {"question": "q1", "answer": "a1"}
    assert chat_id == "session-1"
    assert jitai.threads[0] != threading.main_thread().name


async def test_jitai_adapter_return_value_and_errors() -> None:
    def returns_only(params: Any, chat_id: str, callback: Any) -> str:
        return "whole answer"

    def fails(params: Any, chat_id: str, callback: Any) -> str:
        callback("before ")
        raise ValueError("run failed")

    assert await collect(from_stream_callback(returns_only)(make_request())) == ["whole answer"]
    received: list[str] = []
    with pytest.raises(ValueError, match="run failed"):
        async with asyncio.timeout(LIMIT):
            async for chunk in from_stream_callback(fails)(make_request()):
                received.append(chunk)
    assert received == ["before "]


async def test_jitai_adapter_custom_params() -> None:
    seen: list[Any] = []

    def run(params: Any, chat_id: str, callback: Any) -> None:
        seen.append(params)
        callback("ok")

    answer = from_stream_callback(run, params=lambda request: {"input": request.text})
    assert await collect(answer(make_request("x"))) == ["ok"]
    assert seen == [{"input": "x"}]


async def test_blocking_agent_code_is_not_capped_by_the_default_thread_pool() -> None:
    # asyncio's default pool has min(32, cpus + 4) threads: 6 on two cores.  Forty blocking calls
    # that each wait for all the others can only finish if they all run at once.
    from gateway.agent import call_in_thread, iterate_in_thread

    calls = 40
    barrier = threading.Barrier(calls, timeout=10)
    names: set[str] = set()

    def blocking() -> str:
        barrier.wait()
        names.add(threading.current_thread().name)
        return "ok"

    def generator() -> Any:
        yield blocking()

    async def through_generator() -> str:
        return "".join([chunk async for chunk in iterate_in_thread(generator())])

    results = await asyncio.gather(
        *(call_in_thread(blocking) for _ in range(calls // 2)),
        *(through_generator() for _ in range(calls - calls // 2)),
    )
    assert results == ["ok"] * calls
    assert all(name.startswith("agent") for name in names)
