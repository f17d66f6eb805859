"""What echo's "platform" shows: a transcript of events per reply, and the channel that writes it.

A real driver's reply channel calls the platform's API; echo's appends events to a transcript that
its HTTP endpoint and terminal read.  Events are plain JSON-able dicts, the same in
``GET /messages/{id}`` and in the server-sent event streams:

    {"event": "thinking"}                                         start()
    {"event": "update", "index": i, "text": part_text}            update(text)
    {"event": "part", "index": i, "text": part_text, "feedback": b}   finish(text, feedback=b)
    {"event": "final", "text": whole_answer, "parts": n}          after the last part's "part"
    {"event": "error", "index": i, "text": answer_so_far, "error": why}   fail(text, error)

"final" and "error" end a transcript.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncGenerator
from typing import Any

from gateway.driver import DriverContext, ReplyChannel
from gateway.models import Incoming

__all__ = ["EchoReply", "Transcript", "Transcripts"]

Event = dict[str, Any]

#: Events after which nothing more is appended (until the core opens the reply anew).
ENDING_EVENTS = frozenset({"final", "error"})


class Transcript:
    """The reply to one message as echo shows it: its events in order, and the text of each part."""

    def __init__(self, message: Incoming) -> None:
        # Kept whole so that feedback can name the reply: ``message.reply_id``.
        self.message = message
        self.events: list[Event] = []
        self.parts: dict[int, str] = {}

    @property
    def text(self) -> str:
        """The answer so far: every part's latest text, in order."""
        return "".join(self.parts[index] for index in sorted(self.parts))

    @property
    def ended(self) -> bool:
        return bool(self.events) and self.events[-1]["event"] in ENDING_EVENTS

    @property
    def state(self) -> str:
        """``thinking`` (nothing shown yet), ``streaming``, ``final`` or ``failed``."""
        last = self.events[-1]["event"] if self.events else "thinking"
        return {"thinking": "thinking", "final": "final", "error": "failed"}.get(last, "streaming")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.message.message_id,
            "reply_id": self.message.reply_id,
            "state": self.state,
            "text": self.text,
            "events": list(self.events),
        }


class Transcripts:
    """The transcripts of the last ``limit`` messages, by message id.

    Bounded because echo may run for days as a test double; a reply still open keeps its transcript
    object (its channel holds it) even after it was dropped from here.
    """

    def __init__(self, limit: int = 1000) -> None:
        self._limit = limit
        self._by_id: OrderedDict[str, Transcript] = OrderedDict()
        # Set and replaced on every change: readers wait on the current one.  One for all
        # transcripts, because readers are few and a waiter list per transcript is more code.
        self._changed = asyncio.Event()

    def get(self, message_id: str) -> Transcript | None:
        return self._by_id.get(message_id)

    def open(self, message: Incoming) -> Transcript:
        """The transcript a new reply to ``message`` writes: the pending one, or a fresh one if the
        last reply had ended (the core answers a resumed message again from the start)."""
        transcript = self._by_id.get(message.message_id)
        if transcript is None or transcript.ended:
            transcript = self._by_id[message.message_id] = Transcript(message)
            if len(self._by_id) > self._limit:
                self._by_id.popitem(last=False)
        return transcript

    async def deliver(self, context: DriverContext, message: Incoming) -> Transcript | None:
        """Hand ``message`` to the core; return the transcript its reply will write, or None for a
        duplicate.  Raises :class:`~gateway.errors.ShuttingDown` like ``context.deliver``.

        The transcript is created before delivering, because the core may open the reply (and emit
        events) before ``deliver`` returns: a reader that started later would miss them."""
        previous = self.get(message.message_id)
        transcript = self.open(message)
        try:
            is_new = await context.deliver(message)
        except BaseException:
            self._undo(transcript, previous)
            raise
        if not is_new:
            # Answered already (maybe before a restart): nothing will write this transcript.
            self._undo(transcript, previous)
            return None
        return transcript

    def _undo(self, transcript: Transcript, previous: Transcript | None) -> None:
        """Put back what :meth:`open` replaced, unless the core has written there since."""
        message_id = transcript.message.message_id
        if transcript is previous or transcript.events or self.get(message_id) is not transcript:
            return
        if previous is None:
            del self._by_id[message_id]
        else:
            self._by_id[message_id] = previous

    def append(self, transcript: Transcript, event: Event) -> None:
        transcript.events.append(event)
        self.wake()

    def wake(self) -> None:
        """Wake every reader: to read new events, or to return if its ``stop`` is set."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(
        self, transcript: Transcript, stop: asyncio.Event
    ) -> AsyncGenerator[Event, None]:
        """Yield the transcript's events, past ones first, until it ends or ``stop`` is set (call
        :meth:`wake` after setting it).  Use under ``contextlib.aclosing``."""
        seen = 0
        while True:
            while len(transcript.events) <= seen and not stop.is_set():
                await self._changed.wait()
            new = transcript.events[seen:]
            for event in new:
                yield event
                if event["event"] in ENDING_EVENTS:
                    return
            seen += len(new)
            if stop.is_set():
                return


class EchoReply(ReplyChannel):
    """Part ``index`` of the reply to one message.  No I/O: it only appends to the transcript, so
    it also works after ``close()`` and for messages resumed after a restart."""

    def __init__(self, transcripts: Transcripts, transcript: Transcript, index: int = 0) -> None:
        self._transcripts = transcripts
        self._transcript = transcript
        self._index = index

    def _emit(self, event: Event) -> None:
        self._transcripts.append(self._transcript, event)

    async def start(self) -> None:
        self._emit({"event": "thinking"})

    async def update(self, text: str) -> None:
        self._transcript.parts[self._index] = text
        self._emit({"event": "update", "index": self._index, "text": text})

    async def finish(self, text: str, *, last: bool, feedback: bool) -> None:
        self._transcript.parts[self._index] = text
        self._emit({"event": "part", "index": self._index, "text": text, "feedback": feedback})
        if last:
            self._emit({"event": "final", "text": self._transcript.text, "parts": self._index + 1})

    async def fail(self, text: str, error: str) -> None:
        self._transcript.parts[self._index] = text
        self._emit(
            {"event": "error", "index": self._index, "text": self._transcript.text, "error": error}
        )

    def follow_up(self, index: int) -> EchoReply:
        return EchoReply(self._transcripts, self._transcript, index)
