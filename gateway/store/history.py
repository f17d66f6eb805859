"""Conversation history: the turns of each session, passed back to the agent as context.

One row per answered turn, keyed on (instance, session key).  Only turns that ended ``answered`` are
written (the core decides); :meth:`HistoryStore.recent` applies the instance's limits (turns,
characters, age) when reading, and :meth:`HistoryStore.prune` deletes what is too old to be read
again.  The table lives in the state database, so history survives a restart.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping

from gateway.agent import HistoryTurn
from gateway.store._db import Database, register_schema

__all__ = ["HistoryStore"]

register_schema(
    "history",
    (
        """
        CREATE TABLE IF NOT EXISTS history (
            instance    TEXT NOT NULL,
            session_key TEXT NOT NULL,
            question    TEXT NOT NULL,
            answer      TEXT NOT NULL,
            at          REAL NOT NULL
        )
        """,
        "CREATE INDEX IF NOT EXISTS history_session ON history (instance, session_key, at)",
        "CREATE INDEX IF NOT EXISTS history_instance_at ON history (instance, at)",
    ),
)


class HistoryStore:
    """The history of every instance, in the shared :class:`Database`.  ``clock`` (epoch seconds)
    is injectable for tests."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    async def append(
        self,
        instance: str,
        session_key: str,
        question: str,
        answer: str,
        *,
        at: float | None = None,
    ) -> None:
        """Add one turn (committed when it returns)."""
        when = self._clock() if at is None else at

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO history (instance, session_key, question, answer, at)"
                " VALUES (?, ?, ?, ?, ?)",
                (instance, session_key, question, answer, when),
            )

        await self._db.write(insert)

    async def recent(
        self, instance: str, session_key: str, *, turns: int, chars: int, max_age: float
    ) -> list[HistoryTurn]:
        """The last ``turns`` turns younger than ``max_age`` seconds, oldest first, without the
        oldest ones that would make the questions and answers longer than ``chars`` in total."""
        if turns <= 0 or chars <= 0:
            return []
        cutoff = self._clock() - max_age

        def select(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = conn.execute(
                "SELECT question, answer FROM history"
                " WHERE instance = ? AND session_key = ? AND at >= ?"
                " ORDER BY at DESC, rowid DESC LIMIT ?",
                (instance, session_key, cutoff, turns),
            ).fetchall()
            return [(str(q), str(a)) for q, a in rows]

        kept: list[HistoryTurn] = []
        total = 0
        for question, answer in await self._db.read(select):  # newest first
            total += len(question) + len(answer)
            if total > chars:
                break
            kept.append(HistoryTurn(question, answer))
        kept.reverse()
        return kept

    async def clear(self, instance: str, session_key: str) -> int:
        """Forget one session's history; return how many turns were deleted."""

        def delete(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM history WHERE instance = ? AND session_key = ?",
                (instance, session_key),
            ).rowcount

        return await self._db.write(delete)

    async def count(self, instance: str, session_key: str | None = None) -> int:
        """How many turns are stored (for one session, or the whole instance)."""

        def select(conn: sqlite3.Connection) -> int:
            if session_key is None:
                row = conn.execute(
                    "SELECT count(*) FROM history WHERE instance = ?", (instance,)
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT count(*) FROM history WHERE instance = ? AND session_key = ?",
                    (instance, session_key),
                ).fetchone()
            return int(row[0])

        return await self._db.read(select)

    async def prune(self, max_age: Mapping[str, float]) -> int:
        """Delete the turns older than their instance's ``max_age`` (seconds); return how many.
        Instances not named are left alone."""
        now = self._clock()

        def delete(conn: sqlite3.Connection) -> int:
            deleted = 0
            for instance, age in max_age.items():
                deleted += conn.execute(
                    "DELETE FROM history WHERE instance = ? AND at < ?", (instance, now - age)
                ).rowcount
            return deleted

        return await self._db.write(delete)
