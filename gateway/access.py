"""The access-control hook: runs before the agent for every message.

:class:`AccessPolicy` is what the runtime calls; :class:`AllowAll` lets everything through (tests)
and :class:`AccessControl` applies an instance's ``[access]`` table, in this order:

1. deny lists (``users_deny`` on the sender, ``conversations_deny`` on the conversation): always win;
2. the chat kind's policy (``single`` / ``group``: open, allowlist, disabled) — admins bypass the
   allow lists but not ``disabled``;
3. ``require_mention`` in groups, when the platform says whether the bot was mentioned (refused
   silently: group chatter that does not address the bot gets no answer at all);
4. the per-sender rate limit (sliding window; admins are not limited);
5. the input limit (truncate with a note, or refuse).

Refusals are logged at DEBUG with ids only, never the message text.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, NoReturn, Protocol

import attrs

from gateway.errors import AccessDenied
from gateway.models import ConversationKind, Incoming

if TYPE_CHECKING:
    from gateway.config.instance import AccessSettings

__all__ = ["MAX_TRACKED_SENDERS", "AccessControl", "AccessPolicy", "AllowAll"]

log = logging.getLogger(__name__)

#: Most senders whose recent messages the rate limiter remembers; the oldest are dropped beyond it.
MAX_TRACKED_SENDERS = 100_000


class AccessPolicy(Protocol):
    async def check(self, message: Incoming) -> Incoming:
        """Return the message to answer (possibly with its text truncated to the input limit, with a
        note appended saying it was shortened); raise AccessDenied(reply_text) to refuse — an empty
        reply_text means: refuse silently (no answer at all)."""
        ...


class AllowAll:
    async def check(self, message: Incoming) -> Incoming:
        return message


def _matches(value: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(value, pattern) for pattern in patterns)


@attrs.define
class AccessControl:
    """The ``[access]`` table of one instance, applied to each incoming message."""

    settings: AccessSettings
    clock: Callable[[], float] = time.monotonic
    max_senders: int = MAX_TRACKED_SENDERS
    #: Refused messages so far (all reasons, silent ones included), for metrics.
    denied: int = 0
    # sender id -> times of its admitted messages inside the window; ordered by last admission,
    # so senders whose window has emptied are at the front.
    _recent: OrderedDict[str, deque[float]] = attrs.field(factory=OrderedDict, init=False)

    @classmethod
    def from_settings(
        cls, settings: AccessSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> AccessControl:
        return cls(settings, clock)

    def is_admin(self, message: Incoming) -> bool:
        """Whether the sender may use admin-only commands."""
        return _matches(message.sender_id, self.settings.admins)

    async def check(self, message: Incoming) -> Incoming:
        s = self.settings
        if _matches(message.sender_id, s.users_deny):
            self._refuse(message, "sender on the deny list", s.denied_reply)
        if _matches(message.conversation_id, s.conversations_deny):
            self._refuse(message, "conversation on the deny list", s.denied_reply)

        admin = self.is_admin(message)
        if message.conversation_kind is ConversationKind.GROUP:
            if s.group == "disabled":
                self._refuse(message, "group chats disabled", s.denied_reply)
            if (
                s.group == "allowlist"
                and not admin
                and not _matches(message.conversation_id, s.conversations_allow)
            ):
                self._refuse(message, "conversation not on the allow list", s.denied_reply)
            if s.require_mention:
                mentioned = message.raw.get("isInAtList")
                if mentioned is not None and not mentioned:
                    self._refuse(message, "bot not mentioned", "")
        else:
            if s.single == "disabled":
                self._refuse(message, "one-to-one chats disabled", s.denied_reply)
            if (
                s.single == "allowlist"
                and not admin
                and not _matches(message.sender_id, s.users_allow)
            ):
                self._refuse(message, "sender not on the allow list", s.denied_reply)

        if s.rate_limit > 0 and not admin and not self._admit(message.sender_id):
            self._refuse(message, "rate limit", s.rate_reply)

        limit = s.max_input_chars
        if limit > 0 and len(message.text) > limit:
            if s.input_overflow == "refuse":
                self._refuse(
                    message,
                    f"input longer than {limit} characters",
                    f"Your message is too long (at most {limit} characters).",
                )
            text = f"{message.text[:limit]}\n\n[message shortened to {limit} characters]"
            message = attrs.evolve(message, text=text)
        return message

    def _admit(self, sender: str) -> bool:
        """Count one message of ``sender`` if it is within the rate limit; say whether it was."""
        now = self.clock()
        horizon = now - self.settings.rate_window
        recent = self._recent
        # Forget senders whose window is empty (the least recently admitted come first).
        while recent:
            oldest = next(iter(recent.values()))
            if oldest[-1] > horizon:
                break
            recent.popitem(last=False)
        times = recent.get(sender)
        if times is None:
            times = recent[sender] = deque(maxlen=self.settings.rate_limit)
        while times and times[0] <= horizon:
            times.popleft()
        if len(times) >= self.settings.rate_limit:
            return False
        times.append(now)
        recent.move_to_end(sender)
        while len(recent) > self.max_senders:
            recent.popitem(last=False)
        return True

    def _refuse(self, message: Incoming, reason: str, reply: str) -> NoReturn:
        self.denied += 1
        log.debug(
            "access refused (%s): instance=%s sender=%s conversation=%s message=%s",
            reason,
            message.instance,
            message.sender_id,
            message.conversation_id,
            message.message_id,
        )
        raise AccessDenied(reply)

    @property
    def tracked_senders(self) -> int:
        """How many senders the rate limiter currently remembers."""
        return len(self._recent)
