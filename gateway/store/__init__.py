"""Persistence under the state directory: one SQLite database holding the inbox, the feedback and
the conversation history.

:class:`Database` owns the file and its worker thread; :class:`Inbox`, :class:`FeedbackStore` and
:class:`HistoryStore` are views on it.  Importing this package registers their tables, so
``Database.open`` creates them.
"""

from gateway.store._db import Database
from gateway.store.feedback import FeedbackRow, FeedbackStore
from gateway.store.history import HistoryStore
from gateway.store.inbox import EntryState, Inbox, InboxEntry

__all__ = [
    "Database",
    "EntryState",
    "FeedbackRow",
    "FeedbackStore",
    "HistoryStore",
    "Inbox",
    "InboxEntry",
]
