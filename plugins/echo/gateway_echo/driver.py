"""The echo driver: a local "platform" served over HTTP (and the terminal), for trying the gateway
without an IM account and as the test double of every other part of it.

Read it as the reference driver: ``serve`` connects once and blocks until ``close``; ``open_reply``
hands out a channel that does the platform's part of a reply; everything else is the core's job.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Literal

import attrs
from aiohttp import web

from gateway.driver import Capabilities, Driver, DriverContext
from gateway.errors import DriverConfigError
from gateway.models import Incoming, Outgoing
from gateway_echo._http import make_app
from gateway_echo._sent import SentMessages
from gateway_echo._terminal import Terminal, default_sender, terminal_wanted
from gateway_echo._transcript import EchoReply, Transcripts

__all__ = ["EchoDriver", "EchoReply", "EchoSettings"]

# close() must return within a second (the Driver contract); serve() usually ends in milliseconds.
_CLOSE_WAIT = 0.8
# A backstop only: serve() ends its own streams on close, so no request should still be running.
_SHUTDOWN_TIMEOUT = 0.2


@attrs.frozen
class EchoSettings:
    host: str = attrs.field(
        default="127.0.0.1",
        metadata={"help": "address the HTTP endpoint listens on (keep it local: it has no auth)"},
    )
    port: int = attrs.field(
        default=0,
        validator=[attrs.validators.ge(0), attrs.validators.le(65535)],
        metadata={"help": "TCP port of the HTTP endpoint; 0 picks a free one (see the log)"},
    )
    terminal: Literal["auto", "on", "off"] = attrs.field(
        default="auto",
        validator=attrs.validators.in_(("auto", "on", "off")),  # also when built directly
        metadata={"help": "chat on stdin/stdout: auto (when stdin is a terminal), on or off"},
    )
    terminal_sender: str = attrs.field(
        default="",
        metadata={"help": "sender id of terminal messages; empty means the login user name"},
    )
    max_text_length: int = attrs.field(
        default=4000,
        validator=attrs.validators.ge(16),
        metadata={"help": "most characters in one reply part; longer answers are split"},
    )


class EchoDriver(Driver):
    title = "Echo"
    description = (
        "A local chat over HTTP and the terminal; no account needed. For trying and testing."
    )
    settings_class = EchoSettings

    settings: EchoSettings

    def __init__(self, settings: EchoSettings, context: DriverContext) -> None:
        super().__init__(settings, context)
        # Kept across serve() calls, like a platform keeps its messages across reconnections.
        self._transcripts = Transcripts()
        self._sent = SentMessages()
        self._url: str | None = None
        self._stop: asyncio.Event | None = None  # set by close(): the running serve() returns
        self._stopped: asyncio.Event | None = None  # set by serve() once it released everything

    # The base class declares a plain attribute; a property is what its docstring asks for when
    # the capabilities depend on settings, which mypy cannot tell apart from a mistake.
    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return Capabilities(
            edits=True,
            streams=True,
            feedback=True,
            proactive=True,
            max_text_length=self.settings.max_text_length,
        )

    @classmethod
    def exclusive_key(cls, settings: Any) -> str | None:
        # Two instances cannot listen on one fixed port; port 0 never clashes.
        return f"{settings.host}:{settings.port}" if settings.port else None

    @property
    def url(self) -> str | None:
        """The HTTP endpoint's base URL while serve() is listening, else None."""
        return self._url

    async def serve(self) -> None:
        # Fresh events for each call: serve() runs again after it raised or after close().
        stop = self._stop = asyncio.Event()
        stopped = self._stopped = asyncio.Event()
        host, port = self.settings.host, self.settings.port
        runner = web.AppRunner(
            make_app(self.context, self._transcripts, self._sent, stop),
            access_log=None,
            shutdown_timeout=_SHUTDOWN_TIMEOUT,
        )
        terminal: Terminal | None = None
        try:
            await runner.setup()
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as exc:
                # Port taken or address not local: retrying soon will not help.
                raise DriverConfigError(f"echo cannot listen on {host}:{port}: {exc}") from exc
            bound_port = runner.addresses[0][1]
            url = self._url = f"http://{_url_host(host)}:{bound_port}"
            self.context.logger.info("echo listening on %s", url)
            self.context.connected()
            if terminal_wanted(self.settings.terminal, sys.stdin):
                terminal = Terminal(
                    self.context,
                    self._transcripts,
                    stop,
                    sender=self.settings.terminal_sender or default_sender(),
                    stdin=sys.stdin,
                    out=sys.stdout,
                    url=url,
                )
                try:
                    await terminal.start()
                except (OSError, ValueError) as exc:
                    terminal = None
                    raise DriverConfigError(
                        f"echo terminal mode needs stdin to be a terminal or a pipe: {exc}"
                    ) from exc
            await stop.wait()
        finally:
            # Also on cancellation: end the open event streams, then the server.
            self._url = None
            stop.set()
            self._transcripts.wake()
            if terminal is not None:
                await terminal.stop()
            await runner.cleanup()
            stopped.set()

    def open_reply(self, message: Incoming) -> EchoReply:
        return EchoReply(self._transcripts, self._transcripts.open(message))

    async def send(self, message: Outgoing) -> str:
        # Echo's "platform" is local: the message is kept for GET /sent and shown in the log.
        message_id = self._sent.add(message)
        self.context.logger.info(
            "echo: proactive message %s to %s %s: %s",
            message_id,
            message.target.value,
            message.to,
            message.text[:80],
            extra={"event": "echo_sent"},
        )
        return message_id

    async def close(self) -> None:
        stop, stopped = self._stop, self._stopped
        if stop is None or stopped is None:
            return  # never served
        stop.set()
        try:
            await asyncio.wait_for(stopped.wait(), _CLOSE_WAIT)
        except TimeoutError:
            self.context.logger.warning("echo: the HTTP server took too long to stop")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
