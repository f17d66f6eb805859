"""Feedback clicks on replies, kept with the question and answer they judge.

One row per (instance, reply, user): a user who changes their mind replaces their rating instead of
counting twice.  The question and answer are copied into the row because the inbox forgets messages
after its TTL, while feedback is kept for whoever reviews it.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import attrs

from gateway.models import FeedbackEvent
from gateway.store._db import Database, register_schema

__all__ = ["FeedbackRow", "FeedbackStore"]

register_schema(
    "feedback",
    (
        """
        CREATE TABLE IF NOT EXISTS feedback (
            instance   TEXT NOT NULL,
            reply_id   TEXT NOT NULL,
            user_id    TEXT NOT NULL,
            message_id TEXT NOT NULL DEFAULT '',
            rating     TEXT NOT NULL,
            comment    TEXT NOT NULL DEFAULT '',
            question   TEXT NOT NULL DEFAULT '',
            answer     TEXT NOT NULL DEFAULT '',
            at         REAL NOT NULL,
            PRIMARY KEY (instance, reply_id, user_id)
        )
        """,
        "CREATE INDEX IF NOT EXISTS feedback_at ON feedback (at)",
        "CREATE INDEX IF NOT EXISTS feedback_instance_at ON feedback (instance, at)",
    ),
)

_COLUMNS = "instance, reply_id, user_id, message_id, rating, comment, question, answer, at"


@attrs.frozen
class FeedbackRow:
    """One user's current rating of one reply.  ``at`` is the time of their latest click."""

    instance: str
    reply_id: str
    user_id: str
    message_id: str
    rating: str
    comment: str
    question: str
    answer: str
    at: float

    @classmethod
    def _from_row(cls, row: tuple[Any, ...]) -> FeedbackRow:
        return cls(*row)


class FeedbackStore:
    """Feedback of every instance, in the shared :class:`Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def record(self, event: FeedbackEvent, *, question: str, answer: str) -> None:
        """Store ``event``, replacing the same user's earlier rating of the same reply.

        Rating, comment and time always come from the latest click; the message id, question and
        answer only when the new click has them (a platform may send them with the first click only,
        and a reply pruned from the inbox meanwhile leaves the core nothing to copy)."""

        def upsert(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO feedback ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (instance, reply_id, user_id) DO UPDATE SET"
                " rating = excluded.rating,"
                " comment = excluded.comment,"
                " at = excluded.at,"
                " message_id = coalesce(nullif(excluded.message_id, ''), message_id),"
                " question = coalesce(nullif(excluded.question, ''), question),"
                " answer = coalesce(nullif(excluded.answer, ''), answer)",
                (
                    event.instance,
                    event.reply_id,
                    event.user_id,
                    event.message_id,
                    event.rating,
                    event.comment,
                    question,
                    answer,
                    event.at,
                ),
            )

        await self._db.write(upsert)

    async def rows(self, instance: str | None = None) -> list[FeedbackRow]:
        """Every row (or one instance's), newest click first."""

        def select(conn: sqlite3.Connection) -> list[FeedbackRow]:
            if instance is None:
                cursor = conn.execute(
                    f"SELECT {_COLUMNS} FROM feedback ORDER BY at DESC, rowid DESC"
                )
            else:
                cursor = conn.execute(
                    f"SELECT {_COLUMNS} FROM feedback WHERE instance = ?"
                    " ORDER BY at DESC, rowid DESC",
                    (instance,),
                )
            return [FeedbackRow._from_row(row) for row in cursor.fetchall()]

        return await self._db.read(select)
