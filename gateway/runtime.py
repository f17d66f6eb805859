"""The running gateway: instances, each isolated, answering messages.

:class:`Gateway` owns the process-wide parts (the SQLite inbox and feedback store) and a set of
:class:`InstanceRuntime` objects, which it can start, stop and restart one at a time.  An instance
runtime owns one driver (under the :class:`~gateway.supervisor.Supervisor`), one agent, and the turns
in flight.  Nothing one instance does can stop another: each runs in its own task and every error is
caught, logged with the instance name, and answered where possible.

The life of a message::

    driver ── deliver() ──> inbox.add (durable) ──> driver ACKs
                               │ new
                               └─> access check ──> denied: the reason (or nothing), done
                                      ├─> command (/reset /help /stop): answered at once, done
                                      ├─> session busy: the busy policy (queue, collect, drop,
                                      │   interrupt)
                                      ├─> ReplyStream.open()      ("thinking…" at once)
                                      └─> SessionScheduler.submit (one turn at a time per session)
                                             └─> history ─> agent chunks ─> stream.push ... finish
                                                    └─> inbox.finish (done; pruned after the TTL)
                                                    └─> history.append (answered turns only)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

import attrs

from gateway.access import AccessControl, AccessPolicy
from gateway.agent import Agent, AgentRequest, HistoryTurn, stream_answer
from gateway.commands import (
    NOTHING_TO_STOP_REPLY,
    RESET_REPLY,
    STOPPED_REPLY,
    Command,
    parse_command,
)
from gateway.config.instance import InstanceConfig
from gateway.config.process import ProcessSettings
from gateway.driver import Driver
from gateway.errors import AccessDenied, AgentError, ShuttingDown
from gateway.logs import current_instance, instance_logger
from gateway.metrics import Metrics
from gateway.models import FeedbackEvent, Incoming, Outcome, Outgoing, Reply
from gateway.outbound import Sent, send
from gateway.pacing import PacingPolicy, ReplyStream
from gateway.sessions import SessionScheduler
from gateway.store import Database, FeedbackStore, HistoryStore, Inbox, Outbox
from gateway.supervisor import InstanceState, InstanceStatus, Supervisor

__all__ = ["FailedStart", "Gateway", "InstanceRuntime", "ReloadResult", "StopReason"]

_EMPTY = "The agent returned no answer."
_GAVE_UP = "This message could not be answered (it was interrupted by failures several times)."
_STOPPED = "The answer was stopped."
_SUPERSEDED = "The answer was interrupted by a newer message."
_COLLECTED = "Answered together with your later message(s): see the reply to your last one."
_BROKEN = "Something went wrong while answering."
_FINALISE_TIMEOUT = 5.0
#: How long stored messages may wait to be admitted while others wait for their ACK (seconds).
_ACK_FIRST = 0.05
#: Admissions per event-loop step when a backlog is admitted.
_ADMIT_CHUNK = 64


class StopReason(enum.Enum):
    """Why an instance stops; the value is what an answer interrupted by it tells the user."""

    SHUTDOWN = "The answer was interrupted because the gateway is stopping."
    #: a reload restarts the instance with a changed config (interrupted answers are not resumed)
    RESTART = (
        "The answer was interrupted because this bot is being reconfigured. "
        "Please send your message again."
    )
    #: a reload removes or disables the instance: messages still queued are finalised too, since
    #: no next start of it will resume them
    REMOVED = "The answer was interrupted because this bot has been switched off."


class InstanceRuntime:
    """One instance while it runs.  Implements the :class:`~gateway.driver.DriverContext` protocol."""

    def __init__(
        self,
        config: InstanceConfig,
        *,
        inbox: Inbox,
        feedback_store: FeedbackStore,
        process: ProcessSettings,
        history: HistoryStore | None = None,
        access: AccessPolicy | None = None,
        supervisor_options: dict[str, object] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.metrics.track(config.name)
        self.instance = config.name
        self.logger = instance_logger(config.name)
        self.state_dir: Path = process.state_path / "instances" / config.name
        self.status = InstanceStatus(driver=config.driver_type)
        self._inbox = inbox
        self._feedback = feedback_store
        self._process = process
        self._history = history or HistoryStore(inbox._db)
        self._access: AccessPolicy = access or AccessControl.from_settings(config.access)
        self._scheduler = SessionScheduler(config.conversation.concurrency)
        self._waiting: dict[str, list[_Turn]] = {}  # per session: turns submitted, not started
        self._running: dict[str, _Turn] = {}  # per session: the turn being answered
        self._resets: dict[str, int] = {}  # per session: how many /reset so far
        self._side: set[asyncio.Task[None]] = set()  # replies answered outside the turns
        self._accepting = True
        self._stop_reason = StopReason.SHUTDOWN
        self._delivering = 0  # deliver() calls waiting for their inbox commit (unacknowledged)
        self._delivered = asyncio.Event()  # set when that count drops to 0
        self._admissions: collections.deque[Incoming] = collections.deque()  # stored, not admitted
        self._admitter: asyncio.Task[None] | None = None
        self._admission_closed = False  # set by stop(): later commits wait for the next start
        self.driver: Driver = config.driver_class(config.settings, self)
        self.agent: Agent = config.agent_class(config.agent_settings)
        self._supervisor = Supervisor(
            self.driver.serve,
            self.status,
            config.reconnect,
            self.logger,
            **(supervisor_options or {}),  # type: ignore[arg-type]
        )
        self._task: asyncio.Task[None] | None = None

    # -- DriverContext -------------------------------------------------------------------------

    def connected(self) -> None:
        self._supervisor.connected()

    def frame_received(self) -> None:
        self.status.last_frame = time.time()

    def api_call(self, outcome: str) -> None:
        self.metrics.api_call(self.instance, outcome)

    async def deliver(self, message: Incoming) -> bool:
        if message.instance != self.instance:
            raise ValueError(
                f"message for instance {message.instance!r} delivered to {self.instance!r}"
            )
        if not self._accepting:
            raise ShuttingDown(f"instance {self.instance} is stopping")
        # Once the inbox has the message it must also be admitted, even if the driver's task is
        # cancelled meanwhile (its connection ended); otherwise the message would sit in the inbox
        # unanswered, and its redelivery would be taken for a duplicate.  So the write's own
        # callback queues it, and the driver only waits (shielded) for the commit: it ACKs then,
        # before any answering work of this message is started.
        storing = self._inbox.submit_add(message)
        storing.add_done_callback(functools.partial(self._stored, message))
        self._delivering += 1
        try:
            return await asyncio.shield(storing)
        finally:
            self._delivering -= 1
            if not self._delivering:
                self._delivered.set()

    def _stored(self, message: Incoming, storing: asyncio.Future[bool]) -> None:
        if storing.cancelled() or storing.exception() is not None:
            return  # not stored: the driver does not acknowledge it (deliver raised)
        if not storing.result():
            self.logger.info(
                "duplicate message %s ignored",
                message.message_id,
                extra={"message_id": message.message_id, "event": "duplicate"},
            )
            self.metrics.message(self.instance, "duplicate")
            return
        self.metrics.message(self.instance, "received")
        if self._admission_closed:
            # Stored after stop() admitted the last messages: the driver is closing, so the
            # message is answered when the instance starts again (the inbox resumes it).
            self.logger.info(
                "message %s stored while stopping; it is answered at the next start",
                message.message_id,
                extra={"message_id": message.message_id, "event": "deferred"},
            )
            return
        self._admissions.append(message)
        if self._admitter is None or self._admitter.done():
            self._admitter = asyncio.get_running_loop().create_task(self._admit_stored())

    async def _admit_stored(self) -> None:
        """Admit the stored messages in the order they were stored, ACKs first: while other
        messages are still being stored (their ACKs wait for that), no new turn or placeholder is
        started for at most ``_ACK_FIRST`` seconds, so a burst is acknowledged before the answers'
        platform calls compete with it for the event loop.  Never raises (``_admit`` does not)."""
        while self._admissions:
            await self._deliveries_done(_ACK_FIRST)
            for done in range(len(self._admissions)):
                if done and not done % _ADMIT_CHUNK:
                    await asyncio.sleep(0)  # a big backlog does not hold the loop in one step
                await self._admit(self._admissions.popleft())

    async def _deliveries_done(self, timeout: float) -> None:
        """Until no deliver() waits for its inbox commit any more, or ``timeout`` seconds."""
        if not self._delivering:
            return
        self._delivered.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._delivered.wait()

    async def feedback(self, event: FeedbackEvent) -> None:
        # Platforms report a click on a reply; some name the message, some only the reply.
        if event.message_id:
            entry = await self._inbox.entry(event.instance, event.message_id)
        else:
            entry = await self._inbox.entry_for_reply(event.instance, event.reply_id)
        if entry is not None and not event.message_id:
            event = attrs.evolve(event, message_id=entry.message.message_id)
        await self._feedback.record(
            event,
            question=entry.message.text if entry else "",
            answer=entry.answer if entry and entry.answer else "",
        )
        self.metrics.feedback(self.instance, event.rating)
        self.logger.info(
            "feedback %r on message %s",
            event.rating,
            event.message_id,
            extra={"message_id": event.message_id, "event": "feedback"},
        )

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"instance:{self.instance}"
        )
        return self._task

    async def _run(self) -> None:
        current_instance.set(self.instance)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.logger.info(
            "starting (%s driver, %s agent)", self.config.driver_type, self.config.agent_type
        )
        try:
            await self._resume()
            await self._supervisor.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            # The supervisor retries forever; reaching this is a bug, but it must stay in this instance.
            self.logger.exception("instance stopped by an unexpected error")
            self.status.state = InstanceState.FAILED

    async def _resume(self) -> None:
        for entry in await self._inbox.expired_pending():
            if entry.message.instance == self.instance:
                self.logger.error(
                    "message %s was never answered and expired; giving up on it",
                    entry.message.message_id,
                    extra={"message_id": entry.message.message_id, "event": "expired"},
                )
                await self._inbox.finish(Reply.for_message(entry.message, "", Outcome.FAILED))
        pending = await self._inbox.pending(self.instance)
        if pending:
            self.logger.info(
                "resuming %d unanswered message(s)", len(pending), extra={"event": "resume"}
            )
        for message in pending:
            await self._admit(message)

    async def stop(self, grace: float, reason: StopReason = StopReason.SHUTDOWN) -> None:
        """Stop taking messages (the state is ``stopping`` meanwhile), let turns finish for
        ``grace`` seconds, finalise the running ones as interrupted (the reply says ``reason``),
        then close the driver and the agent.  Messages still queued stay pending for the next
        start, except when the instance is removed: then they are finalised as well."""
        self._accepting = False
        self.status.state = InstanceState.STOPPING
        self._stop_reason = reason
        # Commits already under way: their messages are ACKed, so take them in now.
        await self._deliveries_done(_FINALISE_TIMEOUT)
        if self._admitter is not None:
            await self._admitter  # stored messages become turns (or stay queued) like the others
        self._admission_closed = True
        if not await self._scheduler.wait(grace):
            self.logger.warning(
                "interrupting the answers still running", extra={"event": "interrupt"}
            )
            await self._scheduler.cancel()
            if reason is StopReason.REMOVED:
                for turns in self._waiting.values():
                    for turn in turns:
                        self._drop(turn, reason.value)
                self._waiting.clear()
        if self._side:
            await asyncio.wait(set(self._side), timeout=_FINALISE_TIMEOUT)
        self._supervisor.stopping = True
        await self._close_quietly("driver", self.driver.close())
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close_quietly("agent", self.agent.close())
        self.status.state = InstanceState.STOPPED
        self.status.connected_since = None
        self.logger.info("stopped", extra={"event": "stopped"})

    async def _close_quietly(self, what: str, closing: object) -> None:
        try:
            async with asyncio.timeout(_FINALISE_TIMEOUT):
                await closing  # type: ignore[misc]
        except Exception as exc:  # errors during shutdown are logged, never raised
            self.logger.warning("closing the %s failed: %s: %s", what, type(exc).__name__, exc)

    # -- answering -----------------------------------------------------------------------------

    def session_key(self, message: Incoming) -> str:
        match self.config.conversation.session_key:
            case "conversation":
                return f"c:{message.conversation_id}"
            case "sender_in_conversation":
                return f"s:{message.conversation_id}:{message.sender_id}"
            case _:
                return f"s:{message.sender_id}"

    def _open_stream(self, message: Incoming, *, feedback: bool | None = None) -> ReplyStream:
        stream = ReplyStream(
            self.driver.open_reply(message),
            policy=PacingPolicy.from_settings(self.config.reply),
            capabilities=self.driver.capabilities,
            feedback=self.config.reply.feedback if feedback is None else feedback,
            logger=self.logger,
            message_id=message.message_id,
        )
        stream.open()
        return stream

    async def _admit(self, message: Incoming) -> None:
        """Access control, then a command, a busy reply or a turn.  Never raises: the message is
        in the inbox already, so it must end answered whatever happens here."""
        try:
            checked = await self._access.check(message)
        except AccessDenied as exc:
            self._deny(message, str(exc))
            return
        except Exception:
            self.logger.exception(
                "access control failed on message %s",
                message.message_id,
                extra={"message_id": message.message_id},
            )
            self._reply_now(message, _BROKEN, Outcome.FAILED, error=True)
            return
        try:
            self._dispatch(message, checked)
        except Exception:
            self.logger.exception(
                "scheduling message %s failed",
                message.message_id,
                extra={"message_id": message.message_id},
            )
            self._reply_now(message, _BROKEN, Outcome.FAILED, error=True)

    def _deny(self, message: Incoming, reply: str) -> None:
        self.status.denied += 1
        self.logger.debug(
            "denied message %s%s",
            message.message_id,
            "" if reply else " (silently)",
            extra={"message_id": message.message_id, "event": "denied"},
        )
        if reply:
            self._reply_now(message, reply, Outcome.DENIED, error=True)
        else:
            # A silent refusal shows nothing at all: no placeholder was opened.
            self.metrics.message(self.instance, Outcome.DENIED.value)
            self._side_task(self._inbox.finish(Reply.for_message(message, "", Outcome.DENIED)))

    def _dispatch(self, message: Incoming, checked: Incoming) -> None:
        conv = self.config.conversation
        key = self.session_key(message)
        command = parse_command(checked.text, conv.command_prefix)
        if command is not None:
            self._command(message, key, command)
            return
        policy = conv.busy if self._scheduler.session_busy(key) else "queue"
        if policy == "drop":
            self._reply_now(message, conv.busy_reply, Outcome.ANSWERED)
            return
        waiting = self._waiting.setdefault(key, [])
        if policy == "collect" and waiting and waiting[-1].collecting:
            waiting[-1].parts.append(self._part(message, checked))
            return
        if policy == "interrupt":
            for turn in waiting:
                self._drop(turn, _SUPERSEDED)
            waiting.clear()
            running = self._running.get(key)
            if running is not None and self._scheduler.session_running(key):
                running.cancel_reply = _SUPERSEDED
                self._scheduler.cancel_running(key)
        turn = _Turn(key, [self._part(message, checked)], collecting=policy == "collect")
        waiting.append(turn)

        async def job() -> None:
            waiting = self._waiting.get(key, [])
            if turn in waiting:
                waiting.remove(turn)
            if not waiting:
                self._waiting.pop(key, None)
            try:
                if turn.dropped:
                    return  # finalised when it was dropped
                self._running[key] = turn
                await self._answer(turn)
            finally:
                if self._running.get(key) is turn:
                    del self._running[key]
                self.status.in_flight -= len(turn.parts)

        self._scheduler.submit(key, job)

    def _part(self, message: Incoming, checked: Incoming) -> _Part:
        self.status.in_flight += 1
        return _Part(message, checked, self._open_stream(message))

    def _drop(self, turn: _Turn, reply: str) -> None:
        """Finalise a turn that has not started (replaced by a newer message with busy =
        interrupt, or its instance removed) with ``reply``."""
        turn.dropped = True

        async def finalise() -> None:
            for part in turn.parts:
                await part.stream.fail("", reply)
                await self._inbox.finish(Reply.for_message(part.original, "", Outcome.INTERRUPTED))
                self.metrics.message(self.instance, Outcome.INTERRUPTED.value)

        self._side_task(finalise())

    def _command(self, message: Incoming, key: str, command: Command) -> None:
        self.logger.info(
            "command /%s in message %s",
            command.value,
            message.message_id,
            extra={"message_id": message.message_id, "event": "command"},
        )
        match command:
            case Command.RESET:
                self._resets[key] = self._resets.get(key, 0) + 1
                instance = self.instance

                async def clear() -> None:
                    await self._history.clear(instance, key)

                self._reply_now(message, RESET_REPLY, Outcome.ANSWERED, before=clear)
            case Command.HELP:
                self._reply_now(message, self.config.conversation.help_text, Outcome.ANSWERED)
            case Command.STOP:
                running = self._running.get(key)
                stopped = running is not None and self._scheduler.session_running(key)
                if running is not None and stopped:
                    running.cancel_reply = _STOPPED
                    self._scheduler.cancel_running(key)
                reply = STOPPED_REPLY if stopped else NOTHING_TO_STOP_REPLY
                self._reply_now(message, reply, Outcome.ANSWERED)

    def _reply_now(
        self,
        message: Incoming,
        text: str,
        outcome: Outcome,
        *,
        error: bool = False,
        before: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Answer ``message`` with ``text`` at once, outside the session's turns (commands, busy
        and refusal replies), and mark it done."""
        self.status.in_flight += 1
        stream = self._open_stream(message, feedback=False)

        async def reply() -> None:
            try:
                final, result, failed = text, outcome, error
                try:
                    if before is not None:
                        await before()
                except Exception:
                    self.logger.exception(
                        "answering message %s failed",
                        message.message_id,
                        extra={"message_id": message.message_id},
                    )
                    final, result, failed = _BROKEN, Outcome.FAILED, True
                if failed:
                    await stream.fail("", final)
                else:
                    await stream.finish(final)
                await self._inbox.finish(Reply.for_message(message, final, result))
                self.metrics.message(self.instance, result.value)
            finally:
                self.status.in_flight -= 1

        self._side_task(reply())

    def _side_task(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._side.add(task)
        task.add_done_callback(self._side_done)

    def _side_done(self, task: asyncio.Task[None]) -> None:
        self._side.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.logger.error(
                "finishing a reply failed: %s: %s", type(exc).__name__, exc, exc_info=exc
            )

    async def _prepare(self, message: Incoming) -> Incoming:
        try:
            return await self.driver.prepare(message)
        except Exception as exc:
            self.logger.warning(
                "preparing message %s failed (%s: %s); answering it as received",
                message.message_id,
                type(exc).__name__,
                exc,
                extra={"message_id": message.message_id},
            )
            return message

    async def _load_history(self, key: str) -> list[HistoryTurn]:
        conv = self.config.conversation
        if conv.history_turns <= 0:
            return []
        try:
            return await self._history.recent(
                self.instance,
                key,
                turns=conv.history_turns,
                chars=conv.history_chars,
                max_age=conv.history_max_age,
            )
        except Exception as exc:
            self.logger.warning(
                "reading the history failed (%s: %s); answering without it",
                type(exc).__name__,
                exc,
            )
            return []

    async def _remember(self, key: str, question: str, answer: str) -> None:
        try:
            await self._history.append(self.instance, key, question, answer)
        except Exception as exc:
            self.logger.warning("storing the history failed: %s: %s", type(exc).__name__, exc)

    async def _finish_turn(self, turn: _Turn, text: str, outcome: Outcome) -> None:
        """Record the outcome of every message of the turn; the earlier messages of a collected
        turn get a short note pointing to the reply of the last one."""
        for part in turn.parts[:-1]:
            await part.stream.finish(_COLLECTED)
            await self._inbox.finish(Reply.for_message(part.original, _COLLECTED, outcome))
        await self._inbox.finish(Reply.for_message(turn.parts[-1].original, text, outcome))
        self.metrics.message(self.instance, outcome.value, len(turn.parts))

    async def _answer(self, turn: _Turn) -> None:
        last = turn.parts[-1]
        message, stream = last.original, last.stream
        extra = {"message_id": message.message_id, "conversation": message.conversation_id}
        conv = self.config.conversation
        text = ""
        question = ""
        outcome = Outcome.ANSWERED
        generation = self._resets.get(turn.key, 0)
        started, first_chunk = time.monotonic(), True
        try:
            for part in turn.parts[:-1]:
                await part.stream.finish(_COLLECTED)
            # One round trip to the database for both: queued together, they share a batch of its
            # worker (and no task is needed for either).
            starting = [self._inbox.start(self.instance, p.original.message_id) for p in turn.parts]
            history = await self._load_history(turn.key)
            attempts = max([await count for count in starting])
            if attempts > self._process.max_attempts:
                self.logger.error(
                    "giving up on message %s after %d attempts",
                    message.message_id,
                    attempts - 1,
                    extra={**extra, "event": "gave_up"},
                )
                outcome = Outcome.FAILED
                await stream.fail("", _GAVE_UP)
            else:
                prepared = [await self._prepare(part.message) for part in turn.parts]
                message = _merge(prepared)
                if not message.text.strip() and not message.attachments:
                    # A bare mention or a message type the platform gave us nothing of: no agent.
                    await stream.finish(conv.empty_reply)
                else:
                    request = AgentRequest.for_message(
                        message, session_key=turn.key, history=history
                    )
                    async for chunk in stream_answer(
                        self.agent, request, timeout=conv.timeout, idle_timeout=conv.idle_timeout
                    ):
                        if first_chunk:
                            first_chunk = False
                            self.metrics.first_chunk(self.instance, time.monotonic() - started)
                        text += chunk
                        stream.push(text)
                    if text.strip():
                        self.metrics.answer(self.instance, time.monotonic() - started)
                        await stream.finish(text)
                        question = message.text
                    elif not message.text.strip():
                        # Only attachments, and the agent had nothing to say about them.
                        await stream.finish(conv.attachments_reply)
                    else:
                        outcome = Outcome.FAILED
                        await stream.fail(text, _EMPTY)
        except AgentError as exc:
            outcome = Outcome.FAILED
            cause = exc.__cause__
            self.logger.warning(
                "agent failed on message %s: %s%s",
                message.message_id,
                exc,
                f" ({type(cause).__name__}: {cause})" if cause else "",
                extra={**extra, "event": "agent_failed"},
            )
            await stream.fail(text, str(exc))
        except asyncio.CancelledError:
            outcome = Outcome.INTERRUPTED
            self.logger.info(
                "answer to message %s interrupted",
                message.message_id,
                extra={**extra, "event": "interrupted"},
            )
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_FINALISE_TIMEOUT):
                    await stream.fail(text, turn.cancel_reply or self._stop_reason.value)
                    await self._finish_turn(turn, text, outcome)
            raise
        except Exception:
            # A bug in the core or a plugin: the user still gets an answer and the process goes on.
            outcome = Outcome.FAILED
            self.logger.exception("answering message %s failed", message.message_id, extra=extra)
            await stream.fail(text, _BROKEN)
        await self._finish_turn(turn, stream.outcome_text, outcome)
        if (
            outcome is Outcome.ANSWERED
            and question
            and conv.history_turns > 0
            and self._resets.get(turn.key, 0) == generation
        ):
            await self._remember(turn.key, question, text)
        self.logger.info(
            "answered message %s (%s)",
            message.message_id,
            outcome.value,
            extra={**extra, "event": "answered"},
        )


@attrs.define(eq=False)
class _Part:
    """One message of a turn: as stored (``original``), as access control passed it on
    (``message``, maybe truncated), and its reply."""

    original: Incoming
    message: Incoming
    stream: ReplyStream


@attrs.define(eq=False)
class _Turn:
    """One agent call of a session; several messages when busy = collect merged them."""

    key: str
    parts: list[_Part]
    collecting: bool = False
    dropped: bool = False
    #: what the reply says if /stop or a newer message cancels the turn ("": the instance stopped)
    cancel_reply: str = ""


def _merge(messages: list[Incoming]) -> Incoming:
    """Collected messages as one: texts joined with blank lines, every attachment, the rest of the
    last message."""
    if len(messages) == 1:
        return messages[0]
    text = "\n\n".join(m.text.strip() for m in messages if m.text.strip())
    attachments = tuple(a for m in messages for a in m.attachments)
    return attrs.evolve(messages[-1], text=text, attachments=attachments)


#: The youngest generation's GC threshold for a gateway process (CPython's default is 700).
_GC_THRESHOLD = 50_000


def _tune_gc() -> None:
    """Collect the youngest generation less often in a gateway process.

    With the default threshold, a burst of messages (thousands of turns in flight, each with its
    tasks, futures and HTTP requests alive) made the cycle collector promote and rescan the same
    live objects over and over: about a fifth of the gateway's CPU in the DingTalk bench, mostly
    in full collections.  Objects without cycles are freed by reference counting anyway, so this
    only lets cyclic garbage wait a little longer.  A higher threshold set by the embedding
    process is kept."""
    gen0, gen1, gen2 = gc.get_threshold()
    if 0 < gen0 < _GC_THRESHOLD:
        gc.set_threshold(_GC_THRESHOLD, gen1, gen2)


@attrs.frozen
class ReloadResult:
    """What :meth:`Gateway.apply` did, by instance name (each list sorted)."""

    started: list[str] = attrs.field(factory=list)
    stopped: list[str] = attrs.field(factory=list)
    restarted: list[str] = attrs.field(factory=list)
    unchanged: list[str] = attrs.field(factory=list)
    #: instances whose (re)start failed; they are not running
    failed: list[str] = attrs.field(factory=list)

    def summary(self) -> str:
        """One line: ``reload: started a, b; stopped c; restarted d; 2 unchanged``."""
        parts = [
            f"{verb} {', '.join(names)}"
            for verb, names in (
                ("started", self.started),
                ("stopped", self.stopped),
                ("restarted", self.restarted),
                ("failed", self.failed),
            )
            if names
        ]
        parts.append(f"{len(self.unchanged)} unchanged")
        return "reload: " + "; ".join(parts)


@attrs.define
class FailedStart:
    """An enabled instance whose start raised during a reload.  It is listed (state ``failed``,
    so the gateway is not ready) until a later reload starts it or removes it."""

    config: InstanceConfig
    status: InstanceStatus


class Gateway:
    """All instances of one process, and what they share."""

    def __init__(self, process: ProcessSettings, db: Database) -> None:
        self.process = process
        self._db = db
        self.inbox = Inbox(db, ttl=process.inbox_ttl)
        self.feedback = FeedbackStore(db)
        self.history = HistoryStore(db)
        self.outbox = Outbox(db, ttl=process.inbox_ttl)
        #: the running instances (what messages and proactive sends go to)
        self.instances: dict[str, InstanceRuntime] = {}
        self._stopping: dict[str, InstanceRuntime] = {}  # draining, no longer in ``instances``
        self._failed: dict[str, FailedStart] = {}
        self.metrics = Metrics(lambda: self.listed)
        self._prune_task: asyncio.Task[None] | None = None

    @property
    def listed(self) -> dict[str, InstanceRuntime | FailedStart]:
        """Every instance the operator should see, by name: the running ones, the ones stopping
        (draining during a reload) and the ones whose start failed.  Readiness is judged on these:
        an instance that vanished while stopping or failing would let ``/readyz`` say ready."""
        return {**self._failed, **self._stopping, **self.instances}

    @classmethod
    async def open(cls, process: ProcessSettings) -> Gateway:
        db = await Database.open(process.state_path / "gateway.sqlite3")
        _tune_gc()
        return cls(process, db)

    def start(self, config: InstanceConfig, **runtime_options: object) -> InstanceRuntime | None:
        """Start one instance (ignored, with a log line, if it is disabled)."""
        if not config.enabled:
            logging.getLogger("gateway").info("instance %s is disabled", config.name)
            return None
        if config.name in self.instances:
            raise ValueError(f"instance {config.name} is already running")
        runtime = InstanceRuntime(
            config,
            inbox=self.inbox,
            feedback_store=self.feedback,
            process=self.process,
            history=self.history,
            metrics=self.metrics,
            **runtime_options,  # type: ignore[arg-type]
        )
        self.instances[config.name] = runtime
        self._failed.pop(config.name, None)
        runtime.start()
        if self._prune_task is None:
            self._prune_task = asyncio.get_running_loop().create_task(self._prune_forever())
        return runtime

    async def stop(
        self, name: str, grace: float | None = None, reason: StopReason = StopReason.SHUTDOWN
    ) -> None:
        """Stop the running instance ``name`` (see :meth:`InstanceRuntime.stop`); it is listed as
        stopping until it has stopped.  A removed instance's metrics go with it."""
        runtime = self.instances.pop(name)
        self._stopping[name] = runtime
        try:
            await runtime.stop(self.process.shutdown_grace if grace is None else grace, reason)
        finally:
            del self._stopping[name]
            if reason is StopReason.REMOVED:
                self.metrics.forget(name)

    async def restart(self, config: InstanceConfig) -> None:
        if config.name in self.instances:
            await self.stop(config.name, reason=StopReason.RESTART)
        self.start(config)

    async def apply(
        self, configs: Iterable[InstanceConfig], **runtime_options: object
    ) -> ReloadResult:
        """Make the running set match ``configs``: new enabled instances start, removed or disabled
        ones stop (their answers in flight finish or are finalised within the grace period),
        changed ones (another fingerprint) restart, and unchanged ones are left alone.  Every stop
        runs concurrently, then the starts follow (a port freed by one may be taken by another)."""
        log = logging.getLogger("gateway")
        wanted = {c.name: c for c in configs if c.enabled}
        stopped = sorted(n for n in self.instances if n not in wanted)
        restarted = sorted(
            n
            for n, c in wanted.items()
            if n in self.instances and self.instances[n].config.fingerprint != c.fingerprint
        )
        unchanged = sorted(n for n in wanted if n in self.instances and n not in restarted)
        started = sorted(n for n in wanted if n not in self.instances)
        for name in [n for n in self._failed if n not in wanted]:
            del self._failed[name]  # it never ran: nothing to stop
            self.metrics.forget(name)
        stopping = [
            *((n, StopReason.REMOVED) for n in stopped),
            *((n, StopReason.RESTART) for n in restarted),
        ]
        results = await asyncio.gather(
            *(self.stop(n, reason=reason) for n, reason in stopping), return_exceptions=True
        )
        for (name, _), result in zip(stopping, results, strict=True):
            if isinstance(result, BaseException):
                log.error("instance %s: stopping failed: %r", name, result)
        failed = [
            name
            for name in sorted([*restarted, *started])
            if not self._start_isolated(wanted[name], **runtime_options)
        ]
        return ReloadResult(
            started=[n for n in started if n not in failed],
            stopped=stopped,
            restarted=[n for n in restarted if n not in failed],
            unchanged=unchanged,
            failed=failed,
        )

    async def send(self, message: Outgoing) -> Sent:
        """Send a proactive message through the running instance ``message.instance`` (KeyError if
        there is none); see :func:`gateway.outbound.send`."""
        runtime = self.instances[message.instance]
        sent = await send(runtime.driver, self.outbox, self.metrics, message)
        runtime.logger.info(
            "%s a proactive message to %s %s (%d part(s))",
            "replayed" if sent.replayed else "sent",
            message.target.value,
            message.to,
            len(sent.ids),
            extra={"event": "proactive_replayed" if sent.replayed else "proactive_sent"},
        )
        return sent

    async def start_all(self, configs: Iterable[InstanceConfig]) -> None:
        """Start every enabled instance; one that cannot start is listed as failed (``/readyz``
        says so) and the others run: one broken bot never keeps the rest offline."""
        for config in configs:
            self._start_isolated(config)

    def _start_isolated(self, config: InstanceConfig, **runtime_options: object) -> bool:
        """:meth:`start`, with a failure logged and recorded as the instance's state."""
        try:
            self.start(config, **runtime_options)
        except Exception as exc:
            logging.getLogger("gateway").exception("instance %s: starting failed", config.name)
            status = InstanceStatus(
                driver=config.driver_type,
                state=InstanceState.FAILED,
                last_error=f"starting failed: {type(exc).__name__}: {exc}",
            )
            self._failed[config.name] = FailedStart(config, status)
            return False
        return True

    async def close(self, grace: float | None = None) -> None:
        """Stop every instance concurrently (each drains for ``grace``), then close the stores."""
        names = list(self.instances)
        await asyncio.gather(*(self.stop(n, grace) for n in names), return_exceptions=True)
        if self._prune_task is not None:
            self._prune_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prune_task
        await self._db.close()

    async def _prune_forever(self) -> None:
        log = logging.getLogger("gateway")
        while True:
            try:
                pruned = await self.inbox.prune()
                if pruned:
                    log.info("pruned %d answered message(s) from the inbox", pruned)
            except Exception as exc:
                log.warning("pruning the inbox failed: %s", exc)
            try:
                ages = {
                    name: runtime.config.conversation.history_max_age
                    for name, runtime in self.instances.items()
                }
                pruned = await self.history.prune(ages)
                if pruned:
                    log.info("pruned %d old turn(s) from the conversation history", pruned)
            except Exception as exc:
                log.warning("pruning the conversation history failed: %s", exc)
            try:
                await self.outbox.prune()
            except Exception as exc:
                log.warning("pruning the idempotency keys failed: %s", exc)
            await asyncio.sleep(3600)
