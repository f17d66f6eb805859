"""Persistence under the state directory: one SQLite database holding the inbox, the feedback, the
conversation history and the idempotency keys of proactive messages.

:class:`Database` owns the file and its worker thread; :class:`Inbox`, :class:`FeedbackStore`,
:class:`HistoryStore` and :class:`Outbox` are views on it.  Importing this package registers their tables, so
``Database.open`` creates them.
"""

from gateway.store._db import Database
from gateway.store.feedback import FeedbackRow, FeedbackStore
from gateway.store.history import HistoryStore
from gateway.store.inbox import EntryState, Inbox, InboxEntry
from gateway.store.outbox import Claim, ClaimState, Outbox

__all__ = [
    "Claim",
    "ClaimState",
    "Database",
    "EntryState",
    "FeedbackRow",
    "FeedbackStore",
    "HistoryStore",
    "Inbox",
    "InboxEntry",
    "Outbox",
]
