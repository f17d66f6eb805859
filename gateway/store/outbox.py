"""Idempotency keys of proactive messages: a retried request with the same key sends nothing twice.

The outbound API (``POST /v1/instances/{name}/messages``) lets a caller name a request with an
``Idempotency-Key``.  :meth:`Outbox.claim` records the key *before* the driver sends; the first
request with a key sends and :meth:`Outbox.complete` stores what the platform returned, so every
later request with that key gets the stored result instead of a second message.  A request whose
send failed gives its key back (:meth:`Outbox.release`): nothing was sent, so trying again is safe.

A key still marked *sending* belongs to a request in progress, or to one the gateway was stopped in
the middle of; either way the outcome is unknown, and the caller is told so rather than risking a
duplicate.  Keys are kept for ``ttl`` seconds (the inbox's deduplication window).
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from collections.abc import Callable

import attrs

from gateway.store._db import Database, register_schema

__all__ = ["Claim", "ClaimState", "Outbox"]

register_schema(
    "outbox",
    (
        """
        CREATE TABLE IF NOT EXISTS outbox (
            instance    TEXT NOT NULL,
            key         TEXT NOT NULL,
            fingerprint TEXT NOT NULL,  -- what was asked, so a reused key with new content is caught
            state       TEXT NOT NULL CHECK (state IN ('sending', 'sent')),
            result      TEXT,           -- JSON list of the platform's message ids
            at          REAL NOT NULL,
            PRIMARY KEY (instance, key)
        )
        """,
        "CREATE INDEX IF NOT EXISTS outbox_at ON outbox (at)",
    ),
)


class ClaimState(enum.StrEnum):
    NEW = "new"  # the key is the caller's now: send, then complete() or release()
    SENT = "sent"  # sent before: ``ids`` is what the first request got
    SENDING = "sending"  # another request with the key is in progress (or was interrupted)
    MISMATCH = "mismatch"  # the key was used for a different message


@attrs.frozen
class Claim:
    state: ClaimState
    ids: tuple[str, ...] = ()


class Outbox:
    """The idempotency keys of every instance, in the shared :class:`Database`."""

    def __init__(
        self, db: Database, *, ttl: float = 86400.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._db = db
        self.ttl = ttl
        self._clock = clock

    async def claim(self, instance: str, key: str, fingerprint: str) -> Claim:
        """Take ``key`` for a request described by ``fingerprint``, or say why it cannot be."""
        now = self._clock()

        def take(conn: sqlite3.Connection) -> Claim:
            # An expired key is free again; pruning may not have run yet.
            conn.execute(
                "DELETE FROM outbox WHERE instance = ? AND key = ? AND at < ?",
                (instance, key, now - self.ttl),
            )
            inserted = conn.execute(
                "INSERT INTO outbox (instance, key, fingerprint, state, at)"
                " VALUES (?, ?, ?, 'sending', ?) ON CONFLICT (instance, key) DO NOTHING",
                (instance, key, fingerprint, now),
            ).rowcount
            if inserted:
                return Claim(ClaimState.NEW)
            found, state, result = conn.execute(
                "SELECT fingerprint, state, result FROM outbox WHERE instance = ? AND key = ?",
                (instance, key),
            ).fetchone()
            if found != fingerprint:
                return Claim(ClaimState.MISMATCH)
            if state == "sent":
                return Claim(ClaimState.SENT, tuple(json.loads(result)))
            return Claim(ClaimState.SENDING)

        return await self._db.write(take)

    async def complete(self, instance: str, key: str, ids: tuple[str, ...]) -> None:
        """Record that the message with ``key`` was sent and what the platform called it."""

        def update(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE outbox SET state = 'sent', result = ? WHERE instance = ? AND key = ?",
                (json.dumps(list(ids)), instance, key),
            )

        await self._db.write(update)

    async def release(self, instance: str, key: str) -> None:
        """Give ``key`` back after a send that failed: nothing was sent, a retry may send."""

        def delete(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM outbox WHERE instance = ? AND key = ? AND state = 'sending'",
                (instance, key),
            )

        await self._db.write(delete)

    async def prune(self) -> int:
        """Delete the keys older than ``ttl``; return how many."""
        cutoff = self._clock() - self.ttl

        def delete(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM outbox WHERE at < ?", (cutoff,)).rowcount

        return await self._db.write(delete)
