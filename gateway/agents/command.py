"""The command agent: runs a program for each message and streams its standard output back.

The program is started directly (``asyncio.create_subprocess_exec``, never through a shell) in a
session of its own, so that a time limit, an output limit or a cancellation (/stop, the core's time
limits, shutdown) can kill it *and everything it started* (``os.killpg``), and it is always reaped.

What the program gets:

* ``input = "stdin"`` (default): the message text on standard input, then end of file;
  ``input = "env"``: nothing on standard input (only the variables below).
* Always, on top of the gateway's own environment: ``GATEWAY_TEXT``, ``GATEWAY_SENDER_ID``,
  ``GATEWAY_SENDER_NAME``, ``GATEWAY_CONVERSATION_ID``, ``GATEWAY_CONVERSATION_KIND``,
  ``GATEWAY_SESSION_KEY``, ``GATEWAY_MESSAGE_ID``, ``GATEWAY_INSTANCE`` and ``GATEWAY_HISTORY`` (a
  JSON list of ``{"question": ..., "answer": ...}``, oldest first).  Each is kept under 100 KB
  (the operating system's limit is 128 KiB a variable): a longer text is cut in
  ``GATEWAY_TEXT`` (use standard input for it), the oldest turns leave ``GATEWAY_HISTORY``.

Its standard output (UTF-8) is the answer, streamed as it arrives.  A non-zero exit status is an
error shown to the user with the end of standard error (the text already streamed stays).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from typing import Any, Literal

import attrs

from gateway.agent import Agent, AgentRequest
from gateway.errors import AgentError, AgentTimeout

__all__ = ["CommandAgent", "CommandAgentSettings", "request_environment"]

ENV_VALUE_LIMIT = 100_000  # bytes; Linux's limit for one variable is 128 KiB
_READ_SIZE = 4096
_STDERR_TAIL = 2048
_REAP_TIMEOUT = 5.0  # after SIGKILL, how long to wait for the process to be reaped
_STDERR_GRACE = 1.0  # after exit, how long to wait for the end of stderr (a leftover may hold it)


def _check_argv(_instance: Any, _attribute: Any, value: list[str]) -> None:
    if not value:
        raise ValueError("must not be empty (the program and its arguments)")
    if not value[0]:
        raise ValueError("the program (first item) must not be empty")


@attrs.frozen
class CommandAgentSettings:
    argv: list[str] = attrs.field(
        validator=_check_argv,
        metadata={"help": "the program and its arguments, run without a shell"},
    )
    input: Literal["stdin", "env"] = attrs.field(
        default="stdin",
        metadata={
            "help": 'how the message is given: "stdin" (the text on standard input) or "env" '
            "(only the GATEWAY_* environment variables)"
        },
    )
    timeout: float = attrs.field(
        default=60.0,
        validator=attrs.validators.gt(0),
        metadata={"help": "seconds the program may run; then it (and its children) is killed"},
    )
    cwd: str = attrs.field(
        default="", metadata={"help": 'working directory of the program ("" = the gateway\'s)'}
    )
    max_output: int = attrs.field(
        default=1_000_000,
        validator=attrs.validators.gt(0),
        metadata={"help": "bytes of output kept; beyond them the program is killed"},
    )


def _fit(text: str, limit: int) -> str:
    data = text.encode()
    return text if len(data) <= limit else data[:limit].decode(errors="ignore")


def request_environment(request: AgentRequest) -> dict[str, str]:
    """The ``GATEWAY_*`` variables describing ``request``.

    Linux refuses to start a program with one variable over 128 KiB, so ``GATEWAY_TEXT`` is cut at
    :data:`ENV_VALUE_LIMIT` bytes (the full text is on standard input) and ``GATEWAY_HISTORY`` drops
    its oldest turns to fit.
    """
    turns = [{"question": t.question, "answer": t.answer} for t in request.history]
    history = json.dumps(turns, ensure_ascii=False)
    while turns and len(history.encode()) > ENV_VALUE_LIMIT:
        turns.pop(0)
        history = json.dumps(turns, ensure_ascii=False)
    return {
        "GATEWAY_TEXT": _fit(request.text, ENV_VALUE_LIMIT),
        "GATEWAY_SENDER_ID": request.sender_id,
        "GATEWAY_SENDER_NAME": request.sender_name,
        "GATEWAY_CONVERSATION_ID": request.conversation_id,
        "GATEWAY_CONVERSATION_KIND": str(request.conversation_kind.value),
        "GATEWAY_SESSION_KEY": request.session_key,
        "GATEWAY_MESSAGE_ID": request.message_id,
        "GATEWAY_INSTANCE": request.instance,
        "GATEWAY_HISTORY": history,
    }


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _feed(stdin: asyncio.StreamWriter, data: bytes) -> None:
    """Write the message then close standard input; a program that does not read it is fine."""
    try:
        stdin.write(data)
        await stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        with contextlib.suppress(Exception):
            stdin.close()


async def _collect_tail(stream: asyncio.StreamReader, tail: bytearray) -> None:
    while chunk := await stream.read(_READ_SIZE):
        tail.extend(chunk)
        if len(tail) > _STDERR_TAIL:
            del tail[: len(tail) - _STDERR_TAIL]


async def _finish(task: asyncio.Task[None], timeout: float = 0.0) -> None:
    """Give a helper task ``timeout`` seconds to end, then cancel it.

    Its own errors are dropped; a cancellation of the *calling* task still propagates.
    """
    if not task.done() and timeout > 0:
        await asyncio.wait({task}, timeout=timeout)
    if not task.done():
        task.cancel()
        await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it


class CommandAgent(Agent):
    title = "Command"
    description = "Runs a program for each message; its standard output is the answer."
    settings_class = CommandAgentSettings

    settings: CommandAgentSettings

    async def stream(self, request: AgentRequest) -> AsyncIterator[str]:
        settings = self.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.timeout
        use_stdin = settings.input == "stdin"
        try:
            proc = await asyncio.create_subprocess_exec(
                *settings.argv,
                stdin=asyncio.subprocess.PIPE if use_stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=settings.cwd or None,
                env={**os.environ, **request_environment(request)},
                start_new_session=True,
            )
        except OSError as exc:
            raise AgentError(
                f"The agent program could not be started: {exc.strerror or exc}"
            ) from exc
        assert proc.stdout is not None and proc.stderr is not None
        stderr_tail = bytearray()
        helpers = [asyncio.create_task(_collect_tail(proc.stderr, stderr_tail))]
        if use_stdin:
            assert proc.stdin is not None
            helpers.append(asyncio.create_task(_feed(proc.stdin, request.text.encode())))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        received = 0
        truncated = False
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        data = await proc.stdout.read(_READ_SIZE)
                except TimeoutError:
                    raise self._timeout() from None
                if not data:
                    break
                if received + len(data) > settings.max_output:
                    data = data[: settings.max_output - received]
                    truncated = True
                received += len(data)
                text = decoder.decode(data)
                if text:
                    yield text
                if truncated:
                    _kill_group(proc.pid)
                    break
            text = decoder.decode(b"", final=True)
            if text:
                yield text
            if truncated:
                yield f"\n\n[output truncated: more than {settings.max_output} bytes]"
                return
            try:
                async with asyncio.timeout_at(deadline):
                    returncode = await proc.wait()
            except TimeoutError:
                raise self._timeout() from None
            if returncode != 0:
                # Leftover children may keep stderr open: wait a little, not forever.
                _kill_group(proc.pid)
                await _finish(helpers[0], _STDERR_GRACE)
                tail = stderr_tail.decode("utf-8", errors="replace").strip()
                status = f"exit {returncode}" if returncode > 0 else f"signal {-returncode}"
                message = f"The agent program failed ({status})"
                raise AgentError(f"{message}: {tail}" if tail else f"{message}.")
        finally:
            # Normal end, error, timeout, cancellation or aclose(): nothing of the program survives.
            _kill_group(proc.pid)
            if proc.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(proc.wait()), _REAP_TIMEOUT)
            for task in helpers:
                await _finish(task)
            transport = getattr(proc, "_transport", None)
            if transport is not None:
                transport.close()

    def _timeout(self) -> AgentTimeout:
        return AgentTimeout(
            f"The agent program did not finish within {self.settings.timeout:g} s and was stopped."
        )
