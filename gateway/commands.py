"""Built-in commands: ``/reset``, ``/help``, ``/stop``.

A message is a command when its text starts with the instance's ``command_prefix`` followed by one of
the known names (the first word, case-insensitive).  Commands are answered by the core, without the
agent and without waiting for the session's turn; anything else (``/unknown`` included) goes to the
agent as ordinary text.  An empty prefix disables commands.
"""

from __future__ import annotations

import enum

__all__ = ["Command", "parse_command"]


class Command(enum.StrEnum):
    RESET = "reset"
    HELP = "help"
    STOP = "stop"


#: Replies of the commands (``/help`` answers the instance's ``help_text``).
RESET_REPLY = "History cleared."
STOPPED_REPLY = "Stopped."
NOTHING_TO_STOP_REPLY = "Nothing to stop."


def parse_command(text: str, prefix: str) -> Command | None:
    """The command ``text`` starts with, or None (not a command, unknown command, no prefix)."""
    if not prefix:
        return None
    stripped = text.strip()
    if not stripped.startswith(prefix):
        return None
    words = stripped[len(prefix) :].split(maxsplit=1)
    if not words:
        return None
    try:
        return Command(words[0].lower())
    except ValueError:
        return None
