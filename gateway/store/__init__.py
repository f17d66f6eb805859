"""Persistence under the state directory: one SQLite database holding the inbox and the feedback.

:class:`Database` owns the file and its worker thread; :class:`Inbox` and :class:`FeedbackStore` are
views on it.  Importing this package registers their tables, so ``Database.open`` creates them.
"""

from gateway.store._db import Database
from gateway.store.feedback import FeedbackRow, FeedbackStore
from gateway.store.inbox import EntryState, Inbox, InboxEntry

__all__ = ["Database", "EntryState", "FeedbackRow", "FeedbackStore", "Inbox", "InboxEntry"]
