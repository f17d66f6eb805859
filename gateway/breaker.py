"""A breaker for a platform feature a driver can do without for a while (DingTalk AI cards, Feishu
CardKit cards): after ``threshold`` failures in a row the feature rests ``cooldown`` seconds, during
which the driver uses its plain fallback, so a broken card template or a missing permission costs
one failed call per reply only until the breaker opens, not for every reply forever."""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs

__all__ = ["Breaker"]


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
