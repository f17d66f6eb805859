"""A string type for credentials that never prints itself.

Settings classes type credential fields as :class:`Secret`.  ``str()``, ``repr()`` and f-strings of a
Secret give ``***``; the only way to the value is :meth:`Secret.reveal`, which makes every use of a
credential easy to find in review.  Every Secret created is also registered with the log redactor
(:mod:`gateway.logs`), so a value that leaks into an exception message from a library is still masked.

Drivers wrap the credentials they obtain at run time too (access tokens, connection tickets) as
``Secret(value, short_lived=True)``: masked the same way, but only the latest
:data:`SHORT_LIVED_KEPT` of them are remembered, as a process that runs for months fetches a new
token every few hours and a new ticket on every reconnect, and the redactor looks for every value
it knows in every log line.  The old ones have expired by then.
"""

from __future__ import annotations

import threading
import urllib.parse
from typing import Any, ClassVar

__all__ = ["SHORT_LIVED_KEPT", "Secret", "known_secret_values", "url_secret"]

_MASK = "***"
#: How many short-lived secrets the redactor remembers (the most recent ones).
SHORT_LIVED_KEPT = 256


class Secret:
    """A credential.  Compare with ``==``; read with :meth:`reveal`; prints as ``***``."""

    __slots__ = ("_value",)

    _registry: ClassVar[set[str]] = set()
    # Insertion-ordered: the oldest short-lived value is forgotten first.
    _short_lived: ClassVar[dict[str, None]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, value: str, *, short_lived: bool = False) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value
        # Short values would make the redactor mask ordinary words; they are weak secrets anyway.
        if len(value) >= 4:
            with Secret._lock:
                if not short_lived:
                    Secret._registry.add(value)
                elif value not in Secret._registry:
                    Secret._short_lived.pop(value, None)
                    Secret._short_lived[value] = None
                    while len(Secret._short_lived) > SHORT_LIVED_KEPT:
                        del Secret._short_lived[next(iter(Secret._short_lived))]

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({_MASK!r})"

    def __str__(self) -> str:
        return _MASK

    def __format__(self, spec: str) -> str:
        return _MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> str | tuple[Any, ...]:
        # Pickling would write the value somewhere unintended; nothing in the gateway needs it.
        raise TypeError("Secret values cannot be pickled")


def url_secret(value: str) -> str:
    """Register a credential that goes into a URL (a connection ticket) as short-lived, both as it
    is and URL-encoded (``quote_plus``: a library's error may quote the URL), and return the
    encoded form to put in the URL."""
    encoded = urllib.parse.quote_plus(value)
    Secret(value, short_lived=True)
    Secret(encoded, short_lived=True)
    return encoded


def known_secret_values() -> frozenset[str]:
    """Every secret value created in this process (for the log redactor)."""
    with Secret._lock:
        return frozenset(Secret._registry.union(Secret._short_lived))
