"""Terminal mode: chat with the gateway from the console it runs in.

Each line read from stdin is a message in conversation ``terminal``; its reply is printed as it
grows.  Stdin is read through the event loop (``connect_read_pipe``), not by a blocking read in a
thread: a thread stuck in ``readline`` could not be stopped by ``close()`` and would delay the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import uuid
from typing import IO, Any, TextIO

from gateway.driver import DriverContext
from gateway.errors import ShuttingDown
from gateway.models import Incoming
from gateway_echo._transcript import Event, Transcripts

__all__ = ["Terminal", "default_sender", "terminal_wanted"]

CONVERSATION = "terminal"


def terminal_wanted(mode: str, stdin: IO[Any] | None) -> bool:
    """Whether terminal mode runs: ``on``, ``off``, or ``auto`` = only when a person is typing."""
    if mode != "auto":
        return mode == "on"
    try:
        return stdin is not None and stdin.isatty()
    except (ValueError, OSError):  # closed or detached stdin
        return False


def default_sender() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name, e.g. a container user without a passwd entry
        return "terminal"


class Terminal:
    """Reads stdin lines and prints their replies, until EOF or :meth:`stop`."""

    def __init__(
        self,
        context: DriverContext,
        transcripts: Transcripts,
        stop: asyncio.Event,
        *,
        sender: str,
        stdin: IO[Any],
        out: TextIO,
        url: str,
    ) -> None:
        self._context = context
        self._transcripts = transcripts
        self._stop = stop
        self._sender = sender
        self._stdin = stdin
        self._out = out
        self._url = url
        self._transport: asyncio.ReadTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self._was_blocking = True

    async def start(self) -> None:
        """Start reading.  Raises OSError or ValueError if stdin is not a terminal or a pipe."""
        loop = asyncio.get_running_loop()
        fd = self._stdin.fileno()
        self._was_blocking = os.get_blocking(fd)
        reader = asyncio.StreamReader()
        # A duplicate, because closing the transport closes its file: sys.stdin must stay open for
        # the next serve().  It shares fd 0's O_NONBLOCK flag, which stop() puts back.
        pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
        try:
            self._transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), pipe
            )
        except BaseException:
            pipe.close()
            self._restore_blocking()
            raise
        self._task = asyncio.create_task(self._run(reader), name="echo terminal")
        self._print(f"echo: type a message and press Enter (HTTP endpoint: {self._url})\n")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # asyncio.wait, unlike awaiting the task, does not swallow our own cancellation.
            await asyncio.wait({self._task})
            self._task = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            self._restore_blocking()

    def _restore_blocking(self) -> None:
        # The terminal is usually stdout too: left non-blocking, later prints could fail.
        with contextlib.suppress(OSError, ValueError):
            os.set_blocking(self._stdin.fileno(), self._was_blocking)

    async def _run(self, reader: asyncio.StreamReader) -> None:
        logger = self._context.logger
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than the reader's limit; the rest was dropped
                    self._print("(line too long, ignored)\n")
                    continue
                if not line:
                    break
                text = line.decode(errors="replace").strip()
                if text:
                    await self._ask(text)
        except Exception:
            # The terminal is an extra: its failure must not take the endpoint down, but must show.
            logger.exception("echo terminal mode failed; the HTTP endpoint keeps running")
            return
        logger.info(
            "stdin closed: terminal mode ends; the HTTP endpoint keeps running at %s", self._url
        )

    async def _ask(self, text: str) -> None:
        message = Incoming.create(
            instance=self._context.instance,
            message_id=uuid.uuid4().hex,
            conversation_id=CONVERSATION,
            sender_id=self._sender,
            sender_name=self._sender,
            text=text,
            raw={"text": text, "source": "terminal"},
        )
        try:
            transcript = await self._transcripts.deliver(self._context, message)
        except ShuttingDown:
            self._print("(the gateway is shutting down)\n")
            return
        if transcript is None:  # a fresh id is never a duplicate; nothing to show anyway
            return
        printer = _Printer(self._out)
        async with contextlib.aclosing(self._transcripts.follow(transcript, self._stop)) as events:
            async for event in events:
                printer.show(event)

    def _print(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


class _Printer:
    """Shows one reply as it grows: only the new end of the text while it extends what is shown."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._shown = ""  # the reply's text as printed so far
        self._done = ""  # the text of the finished parts

    def show(self, event: Event) -> None:
        kind = event["event"]
        if kind in ("update", "part"):
            text = self._done + event["text"]
            if kind == "part":
                self._done = text
            self._show(text)
        elif kind == "final":
            self._show(event["text"])
            self._write("\n")
        elif kind == "error":
            self._show(event["text"])
            self._write(f"\n[{event['error']}]\n")

    def _show(self, text: str) -> None:
        if text.startswith(self._shown):
            self._write(text[len(self._shown) :])
        else:
            # The answer changed, not just grew: start it again on a new line.
            self._write("\n" + text)
        self._shown = text

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()
