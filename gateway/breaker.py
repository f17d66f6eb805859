"""A breaker for a platform feature a driver can do without for a while (DingTalk AI cards, Feishu
CardKit cards): after ``threshold`` failures in a row the feature rests ``cooldown`` seconds, during
which the driver uses its plain fallback, so a broken card template or a missing permission costs
one failed call per reply only until the breaker opens, not for every reply forever."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import attrs

__all__ = ["Breaker", "card_failed"]


@attrs.define
class Breaker:
    threshold: int = attrs.field(validator=attrs.validators.ge(1))
    cooldown: float = attrs.field(validator=attrs.validators.ge(0))
    clock: Callable[[], float] = time.monotonic
    _failures: int = attrs.field(default=0, init=False)
    _until: float = attrs.field(default=float("-inf"), init=False)

    @property
    def open(self) -> bool:
        """True while the feature rests: use the fallback without trying."""
        return self.clock() < self._until

    def success(self) -> None:
        self._failures = 0

    def failure(self) -> bool:
        """Count one failure; True when this one opened the breaker (log it once, there)."""
        self._failures += 1
        if self._failures < self.threshold:
            return False
        self._failures = 0
        self._until = self.clock() + self.cooldown
        return True


def card_failed(
    breaker: Breaker,
    log: logging.LoggerAdapter[logging.Logger],
    exc: Exception,
    *,
    reply_as: str,
    answers_as: str,
) -> None:
    """A card call failed with ``exc``: log it (``card_failed``: this reply continues as
    ``reply_as``) and count it; when it opens ``breaker``, log once that answers go out as
    ``answers_as`` while cards rest (``cards_degraded``)."""
    log.warning(
        "card call failed (%s: %s); this reply continues as %s",
        type(exc).__name__,
        exc,
        reply_as,
        extra={"event": "card_failed"},
    )
    if breaker.failure():
        log.warning(
            "%d card failures in a row: answering with %s for %g s",
            breaker.threshold,
            answers_as,
            breaker.cooldown,
            extra={"event": "cards_degraded"},
        )
