"""The running gateway: instances, each isolated, answering messages.

:class:`Gateway` owns the process-wide parts (the SQLite inbox and feedback store) and a set of
:class:`InstanceRuntime` objects, which it can start, stop and restart one at a time.  An instance
runtime owns one driver (under the :class:`~gateway.supervisor.Supervisor`), one agent, and the turns
in flight.  Nothing one instance does can stop another: each runs in its own task and every error is
caught, logged with the instance name, and answered where possible.

The life of a message::

    driver ── deliver() ──> inbox.add (durable) ──> driver ACKs
                               │ new
                               ├─> ReplyStream.open()      ("thinking…" at once)
                               └─> SessionScheduler.submit (one turn at a time per session)
                                      └─> access check ─> agent chunks ─> stream.push ... finish/fail
                                             └─> inbox.finish (done; pruned after the TTL)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import attrs

from gateway.access import AccessPolicy, AllowAll
from gateway.agent import Agent, AgentRequest, stream_answer
from gateway.config.instance import InstanceConfig
from gateway.config.process import ProcessSettings
from gateway.driver import Driver
from gateway.errors import AccessDenied, AgentError, ShuttingDown
from gateway.logs import current_instance, instance_logger
from gateway.models import FeedbackEvent, Incoming, Outcome, Reply
from gateway.pacing import PacingPolicy, ReplyStream
from gateway.sessions import SessionScheduler
from gateway.store import Database, FeedbackStore, Inbox
from gateway.supervisor import InstanceState, InstanceStatus, Supervisor

__all__ = ["Gateway", "InstanceRuntime"]

_INTERRUPTED = "The answer was interrupted because the gateway is stopping."
_EMPTY = "The agent returned no answer."
_GAVE_UP = "This message could not be answered (it was interrupted by failures several times)."
_FINALISE_TIMEOUT = 5.0


class InstanceRuntime:
    """One instance while it runs.  Implements the :class:`~gateway.driver.DriverContext` protocol."""

    def __init__(
        self,
        config: InstanceConfig,
        *,
        inbox: Inbox,
        feedback_store: FeedbackStore,
        process: ProcessSettings,
        access: AccessPolicy | None = None,
        supervisor_options: dict[str, object] | None = None,
    ) -> None:
        self.config = config
        self.instance = config.name
        self.logger = instance_logger(config.name)
        self.state_dir: Path = process.state_path / "instances" / config.name
        self.status = InstanceStatus(driver=config.driver_type)
        self._inbox = inbox
        self._feedback = feedback_store
        self._process = process
        self._access = access or AllowAll()
        self._scheduler = SessionScheduler(config.conversation.concurrency)
        self._accepting = True
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

    async def deliver(self, message: Incoming) -> bool:
        if message.instance != self.instance:
            raise ValueError(
                f"message for instance {message.instance!r} delivered to {self.instance!r}"
            )
        if not self._accepting:
            raise ShuttingDown(f"instance {self.instance} is stopping")
        # Shielded: once the inbox has the message it must also be scheduled, even if the driver's
        # task is cancelled meanwhile (its connection ended); otherwise the message would sit in
        # the inbox unanswered, and its redelivery would be taken for a duplicate.
        storing = asyncio.ensure_future(self._store(message))
        storing.add_done_callback(_outcome_seen)  # a failure is logged by whoever awaits it, if any
        return await asyncio.shield(storing)

    async def _store(self, message: Incoming) -> bool:
        if not await self._inbox.add(message):
            self.logger.info(
                "duplicate message %s ignored",
                message.message_id,
                extra={"message_id": message.message_id, "event": "duplicate"},
            )
            return False
        self._schedule(message)
        return True

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
            self._schedule(message)

    async def stop(self, grace: float) -> None:
        """Stop taking messages, let turns finish for ``grace`` seconds, finalise the rest as
        interrupted, then close the driver and the agent."""
        self._accepting = False
        if not await self._scheduler.wait(grace):
            self.logger.warning(
                "interrupting the answers still running", extra={"event": "interrupt"}
            )
            await self._scheduler.cancel()
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

    def _schedule(self, message: Incoming) -> None:
        stream = ReplyStream(
            self.driver.open_reply(message),
            policy=PacingPolicy.from_settings(self.config.reply),
            capabilities=self.driver.capabilities,
            feedback=self.config.reply.feedback,
            logger=self.logger,
            message_id=message.message_id,
        )
        stream.open()
        self.status.in_flight += 1
        key = self.session_key(message)

        async def turn() -> None:
            try:
                await self._answer(message, stream, key)
            finally:
                self.status.in_flight -= 1

        self._scheduler.submit(key, turn)

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

    async def _answer(self, message: Incoming, stream: ReplyStream, session_key: str) -> None:
        extra = {"message_id": message.message_id, "conversation": message.conversation_id}
        text = ""
        outcome = Outcome.ANSWERED
        try:
            attempts = await self._inbox.start(self.instance, message.message_id)
            if attempts > self._process.max_attempts:
                self.logger.error(
                    "giving up on message %s after %d attempts",
                    message.message_id,
                    attempts - 1,
                    extra={**extra, "event": "gave_up"},
                )
                outcome = Outcome.FAILED
                await stream.fail("", _GAVE_UP)
            elif not message.text.strip() and not message.attachments:
                # A bare mention or a message type the platform gave us nothing of: no agent call.
                await self._access.check(message)
                await stream.finish(self.config.conversation.empty_reply)
            else:
                await self._access.check(message)
                message = await self._prepare(message)
                request = AgentRequest.for_message(message, session_key=session_key)
                conv = self.config.conversation
                async for chunk in stream_answer(
                    self.agent, request, timeout=conv.timeout, idle_timeout=conv.idle_timeout
                ):
                    text += chunk
                    stream.push(text)
                if text.strip():
                    await stream.finish(text)
                elif not message.text.strip():
                    # Only attachments, and the agent had nothing to say about them.
                    await stream.finish(self.config.conversation.attachments_reply)
                else:
                    outcome = Outcome.FAILED
                    await stream.fail(text, _EMPTY)
        except AccessDenied as exc:
            outcome = Outcome.DENIED
            self.logger.info("denied message %s: %s", message.message_id, exc, extra=extra)
            await stream.fail("", str(exc))
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
                    await stream.fail(text, _INTERRUPTED)
                    await self._inbox.finish(Reply.for_message(message, text, outcome))
            raise
        except Exception:
            # A bug in the core or a plugin: the user still gets an answer and the process goes on.
            outcome = Outcome.FAILED
            self.logger.exception("answering message %s failed", message.message_id, extra=extra)
            await stream.fail(text, "Something went wrong while answering.")
        await self._inbox.finish(Reply.for_message(message, stream.outcome_text, outcome))
        self.logger.info(
            "answered message %s (%s)",
            message.message_id,
            outcome.value,
            extra={**extra, "event": "answered"},
        )


def _outcome_seen(task: asyncio.Future[bool]) -> None:
    if not task.cancelled():
        task.exception()


class Gateway:
    """All instances of one process, and what they share."""

    def __init__(self, process: ProcessSettings, db: Database) -> None:
        self.process = process
        self._db = db
        self.inbox = Inbox(db, ttl=process.inbox_ttl)
        self.feedback = FeedbackStore(db)
        self.instances: dict[str, InstanceRuntime] = {}
        self._prune_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, process: ProcessSettings) -> Gateway:
        db = await Database.open(process.state_path / "gateway.sqlite3")
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
            **runtime_options,  # type: ignore[arg-type]
        )
        self.instances[config.name] = runtime
        runtime.start()
        if self._prune_task is None:
            self._prune_task = asyncio.get_running_loop().create_task(self._prune_forever())
        return runtime

    async def stop(self, name: str, grace: float | None = None) -> None:
        runtime = self.instances.pop(name)
        await runtime.stop(self.process.shutdown_grace if grace is None else grace)

    async def restart(self, config: InstanceConfig) -> None:
        if config.name in self.instances:
            await self.stop(config.name)
        self.start(config)

    async def start_all(self, configs: Iterable[InstanceConfig]) -> None:
        for config in configs:
            self.start(config)

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
            await asyncio.sleep(3600)
