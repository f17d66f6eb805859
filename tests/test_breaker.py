"""The breaker drivers degrade a feature with (Feishu's CardKit cards)."""

from __future__ import annotations

from gateway.breaker import Breaker


def test_the_breaker_opens_after_failures_in_a_row_and_closes_after_the_cooldown() -> None:
    now = [100.0]
    breaker = Breaker(3, 10.0, clock=lambda: now[0])
    assert [breaker.failure(), breaker.failure()] == [False, False]
    breaker.success()  # a success resets the count
    assert [breaker.failure(), breaker.failure(), breaker.failure()] == [False, False, True]
    assert breaker.open
    now[0] += 9.9
    assert breaker.open
    now[0] += 0.2
    assert not breaker.open
