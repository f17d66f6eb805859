"""The durable inbox: what makes "ACK fast, answer exactly once" work.

A driver ACKs a message as soon as :meth:`Inbox.add` returned: the message is then committed, so
a crash cannot lose it (it is resumed from :meth:`Inbox.pending` at the next start) and a
redelivery of it is recognised by its key, (instance, platform message id), and not answered
twice.  An entry is *pending* until :meth:`Inbox.finish` marks it *done* with the final text; done
entries are kept for ``ttl`` seconds, the deduplication window, then :meth:`Inbox.prune` deletes
them.

A pending entry is never deleted: one older than ``ttl`` (a message that could never be answered) is
returned by :meth:`Inbox.expired_pending`, so the core can log it and finish it as failed.
:meth:`Inbox.start` counts attempts, so a message that crashes the process every time is given up
instead of crashing it forever.
"""

from __future__ import annotations

import asyncio
import enum
import json
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import attrs

from gateway.models import Incoming, Outcome, Reply
from gateway.store._db import Database, register_schema

__all__ = ["EntryState", "Inbox", "InboxEntry"]

register_schema(
    "inbox",
    (
        """
        CREATE TABLE IF NOT EXISTS inbox (
            instance    TEXT NOT NULL,
            message_id  TEXT NOT NULL,
            reply_id    TEXT NOT NULL,
            record      TEXT NOT NULL,  -- Incoming.to_record() as JSON
            state       TEXT NOT NULL CHECK (state IN ('pending', 'done')),
            received_at REAL NOT NULL,  -- when the inbox stored it (the inbox's clock)
            attempts    INTEGER NOT NULL DEFAULT 0,
            answer      TEXT,
            outcome     TEXT,
            done_at     REAL,
            PRIMARY KEY (instance, message_id)
        )
        """,
        # Partial indexes: the queries below repeat these exact WHERE terms as literals so that
        # SQLite can use them; they stay small because pending entries are few.
        "CREATE INDEX IF NOT EXISTS inbox_pending ON inbox (instance, received_at)"
        " WHERE state = 'pending'",
        "CREATE INDEX IF NOT EXISTS inbox_done ON inbox (done_at) WHERE state = 'done'",
        "CREATE INDEX IF NOT EXISTS inbox_reply ON inbox (instance, reply_id)",
    ),
)

_COLUMNS = "record, state, answer, outcome, attempts, received_at, done_at"


class EntryState(enum.StrEnum):
    PENDING = "pending"  # stored, not answered yet (maybe being answered)
    DONE = "done"  # finished, whatever the outcome; kept for deduplication until pruned


def _optional_outcome(value: Outcome | str | None) -> Outcome | None:
    return None if value is None else Outcome(value)


@attrs.frozen
class InboxEntry:
    """One message in the inbox and what became of it.

    ``received_at`` is when the inbox stored it (the inbox's clock, which the TTL is measured
    against), not the platform's time in ``message.received_at``.  ``answer``, ``outcome`` and
    ``done_at`` are ``None`` while the entry is pending.
    """

    message: Incoming
    state: EntryState = attrs.field(converter=EntryState)
    answer: str | None
    outcome: Outcome | None = attrs.field(converter=_optional_outcome)
    attempts: int
    received_at: float
    done_at: float | None

    @property
    def done(self) -> bool:
        return self.state is EntryState.DONE

    @classmethod
    def _from_row(cls, row: tuple[Any, ...]) -> InboxEntry:
        record, state, answer, outcome, attempts, received_at, done_at = row
        return cls(_message(record), state, answer, outcome, attempts, received_at, done_at)


def _message(record: str) -> Incoming:
    return Incoming.from_record(json.loads(record))


class Inbox:
    """The inbox of every instance of the process, in the shared :class:`Database`.

    ``ttl`` is the deduplication window in seconds; ``clock`` (epoch seconds) is injectable for
    tests.  Every method is durable when it returns.
    """

    def __init__(
        self, db: Database, *, ttl: float = 86400.0, clock: Callable[[], float] = time.time
    ) -> None:
        if ttl <= 0:
            raise ValueError("the inbox TTL must be positive")
        self._db = db
        self.ttl = ttl
        self._clock = clock

    async def add(self, message: Incoming) -> bool:
        """Store ``message`` as pending.  True if it is new, False if its key is already there
        (a redelivery, whatever became of the first copy).  Committed when it returns."""
        return await self.submit_add(message)

    def submit_add(self, message: Incoming) -> asyncio.Future[bool]:
        """:meth:`add` as a future, queued at once and resolved after the COMMIT (see
        :meth:`Database.submit_write`): for a caller that must act on the outcome even if it is
        cancelled while waiting.  A payload that cannot be serialised raises here, at once."""
        # Serialised here, so a payload that cannot be stored fails its caller before the worker.
        record = json.dumps(message.to_record(), ensure_ascii=False, separators=(",", ":"))
        now = self._clock()

        def insert(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "INSERT INTO inbox (instance, message_id, reply_id, record, state, received_at)"
                " VALUES (?, ?, ?, ?, 'pending', ?)"
                " ON CONFLICT (instance, message_id) DO NOTHING",
                (message.instance, message.message_id, message.reply_id, record, now),
            )
            return cursor.rowcount == 1

        return self._db.submit_write(insert)

    def start(self, instance: str, message_id: str) -> asyncio.Future[int]:
        """Count one more attempt at answering the message; the future gives the count (1 the
        first time).  Queued at once, so a read queued right after it shares its round trip.

        Raises ``KeyError`` (from the future) for a message that is not in the inbox."""

        def increment(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "UPDATE inbox SET attempts = attempts + 1"
                " WHERE instance = ? AND message_id = ? RETURNING attempts",
                (instance, message_id),
            ).fetchall()  # fetchall: finish the statement before the transaction goes on
            if not rows:
                raise KeyError(f"message {message_id!r} of {instance!r} is not in the inbox")
            return int(rows[0][0])

        return self._db.submit_write(increment)

    async def finish(self, reply: Reply) -> None:
        """Mark the message done with its final text and outcome (a second call overwrites them).

        Raises ``KeyError`` for a message that is not in the inbox."""
        now = self._clock()

        def update(conn: sqlite3.Connection) -> None:
            cursor = conn.execute(
                "UPDATE inbox SET state = 'done', answer = ?, outcome = ?, done_at = ?"
                " WHERE instance = ? AND message_id = ?",
                (reply.text, reply.outcome.value, now, reply.instance, reply.message_id),
            )
            if cursor.rowcount == 0:
                raise KeyError(
                    f"message {reply.message_id!r} of {reply.instance!r} is not in the inbox"
                )

        await self._db.write(update)

    async def pending(self, instance: str) -> list[Incoming]:
        """The instance's messages not done yet, oldest first (what to resume after a restart)."""

        def select(conn: sqlite3.Connection) -> list[Incoming]:
            rows = conn.execute(
                "SELECT record FROM inbox WHERE state = 'pending' AND instance = ?"
                " ORDER BY received_at, rowid",
                (instance,),
            ).fetchall()
            return [_message(record) for (record,) in rows]

        return await self._db.read(select)

    async def entry(self, instance: str, message_id: str) -> InboxEntry | None:
        """The entry of one message, or None if it is unknown (or was pruned)."""

        def select(conn: sqlite3.Connection) -> InboxEntry | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM inbox WHERE instance = ? AND message_id = ?",
                (instance, message_id),
            ).fetchone()
            return None if row is None else InboxEntry._from_row(row)

        return await self._db.read(select)

    async def entry_for_reply(self, instance: str, reply_id: str) -> InboxEntry | None:
        """The entry whose reply has ``reply_id`` (feedback events may carry only that id)."""

        def select(conn: sqlite3.Connection) -> InboxEntry | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM inbox WHERE instance = ? AND reply_id = ?",
                (instance, reply_id),
            ).fetchone()
            return None if row is None else InboxEntry._from_row(row)

        return await self._db.read(select)

    async def expired_pending(self) -> list[InboxEntry]:
        """Pending entries (of every instance) stored more than ``ttl`` ago, oldest first.

        They are never deleted silently: the core logs them and finishes them as failed, after
        which :meth:`prune` removes them like any other done entry."""
        cutoff = self._clock() - self.ttl

        def select(conn: sqlite3.Connection) -> list[InboxEntry]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM inbox WHERE state = 'pending' AND received_at < ?"
                " ORDER BY received_at, rowid",
                (cutoff,),
            ).fetchall()
            return [InboxEntry._from_row(row) for row in rows]

        return await self._db.read(select)

    async def prune(self) -> int:
        """Delete the done entries finished more than ``ttl`` ago; return how many."""
        cutoff = self._clock() - self.ttl

        def delete(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "DELETE FROM inbox WHERE state = 'done' AND done_at < ?", (cutoff,)
            )
            return cursor.rowcount

        return await self._db.write(delete)
