"""Respecting platform quotas: one token bucket per app, and retries that listen to the platform.

Platforms meter their APIs per *app*, not per connection: DingTalk allows about 20 OpenAPI requests
a second per app and answers 403 ``QpsLimit`` beyond that.  Every instance (and every reply) of one
app therefore draws from one :class:`TokenBucket`, which the process-wide registry
:data:`rate_limits` hands out by key (``rate_limits.bucket(f"dingtalk:{client_id}", 20)``).

:func:`call_with_retry` wraps one platform call: it takes a token before each attempt, retries
transient failures (:class:`~gateway.errors.RetryableError`) with capped, jittered exponential
backoff, and when the platform says "too many requests, retry after N s" it **pauses the whole
bucket** for N seconds.  That last part is what prevents 403 storms: without it, one reply backs off
while every other reply of the same app keeps hammering the API and earns its own 403.

Everything here runs on one event loop and never blocks it; time sources are injectable so tests run
in virtual time.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import attrs
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from gateway.errors import RateLimited, RetryableError

__all__ = [
    "CallOutcome",
    "RateLimits",
    "TokenBucket",
    "call_with_retry",
    "rate_limits",
]

T = TypeVar("T")

#: What :func:`call_with_retry` reports for each attempt (for metrics and logs).
CallOutcome = Literal["ok", "retried", "rate_limited", "failed"]

# Refill arithmetic is floating point: a waiter that slept exactly ``deficit / rate`` may find
# itself 1e-16 tokens short.  Treating that as "enough" avoids a pointless second, near-zero sleep.
_EPSILON = 1e-9


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, not {value!r}")
    return value


class TokenBucket:
    """At most ``rate`` tokens a second on average, at most ``burst`` at once.

    The bucket starts full and refills continuously.  :meth:`acquire` waits for tokens; waiters are
    served strictly in arrival order (*head of line*): only the first waiter sleeps on the clock,
    the others wait for their turn, and nobody may take tokens past a waiter.  So a request for 5
    tokens is never starved by a stream of 1-token requests, and a waiter that is cancelled has
    taken nothing and simply hands the turn to the next one.

    A request for more than ``burst`` tokens (possible after the burst was lowered) waits for a full
    bucket and then takes everything it asked for, leaving a debt that later waiters wait out; the
    average rate is kept either way, and nobody waits forever.

    :meth:`pause` is for the platform's own verdict ("rate limited, retry after N s"): nobody gets a
    token until the pause ends, and the bucket is emptied so that traffic resumes at the steady
    ``rate`` rather than with a burst, which would likely earn the next rate-limit answer at once.

    ``clock`` and ``sleep`` are injectable for tests (virtual time); the bucket is not bound to an
    event loop, so the process-wide registry may outlive one.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._rate, self._burst = self._validated(rate, burst)
        self._tokens = self._burst
        # Tokens are accounted up to this instant.  A pause moves it into the future: refill then
        # starts where the pause ends, which is all a pause needs to be.
        self._stamp = clock()
        # One future per waiter, in arrival order.  The head's future is always done (its turn has
        # come); the others are pending until the waiter before them leaves.
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @staticmethod
    def _validated(rate: float, burst: float | None) -> tuple[float, float]:
        rate = _check_positive("rate", rate)
        burst = max(1.0, rate) if burst is None else _check_positive("burst", burst)
        return rate, burst

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self._rate

    @property
    def burst(self) -> float:
        """The bucket's capacity: how many tokens may be taken at once after a quiet period."""
        return self._burst

    def configure(self, rate: float, burst: float | None = None) -> None:
        """Change the rate and capacity (``burst`` defaults to ``max(1, rate)``, as when created).

        Tokens earned so far are kept (up to the new capacity).  A waiter already sleeping notices
        the change when it wakes up, so a higher rate may take up to one old interval to show.
        """
        rate, burst = self._validated(rate, burst)
        self._refill()
        self._rate, self._burst = rate, burst
        self._tokens = min(self._tokens, burst)

    def pause(self, seconds: float) -> None:
        """Give nobody a token for ``seconds`` from now; extends, never shortens, a pause under way.

        Call it when the platform answered "rate limited" (see :func:`call_with_retry`).
        Non-positive or NaN durations are ignored; an infinite one is refused, as it would block the
        app forever.
        """
        if not seconds > 0:
            return
        if math.isinf(seconds):
            raise ValueError("a pause must be finite")
        now = self._refill()
        self._tokens = min(self._tokens, 0.0)
        self._stamp = max(self._stamp, now + seconds)

    async def acquire(self, tokens: float = 1.0) -> None:
        """Wait until ``tokens`` are available and take them, after everyone who asked earlier."""
        tokens = _check_positive("tokens", tokens)
        if not self._waiters and self._delay(tokens) <= 0:
            self._tokens -= tokens  # fast path: nobody waiting and enough tokens, no await at all
            return
        turn = asyncio.get_running_loop().create_future()
        if not self._waiters:
            turn.set_result(None)
        self._waiters.append(turn)
        try:
            await turn
            while (delay := self._delay(tokens)) > 0:
                await self._sleep(delay)
            self._tokens -= tokens
        finally:
            # Whether we got our tokens or were cancelled (while queued or while sleeping), we leave
            # the queue and the next waiter's turn comes; a cancelled waiter took nothing.
            self._waiters.remove(turn)
            if self._waiters and not self._waiters[0].done():
                self._waiters[0].set_result(None)

    def _refill(self) -> float:
        now = self._clock()
        if now > self._stamp:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
        return now

    def _delay(self, tokens: float) -> float:
        """Seconds until ``tokens`` can be taken (0 if now); recomputed after every sleep, so pauses
        and reconfiguration that happen meanwhile are taken into account."""
        now = self._refill()
        paused = max(0.0, self._stamp - now)
        deficit = min(tokens, self._burst) - self._tokens
        if paused <= 0 and deficit <= _EPSILON:
            return 0.0
        return paused + max(0.0, deficit) / self._rate


@attrs.define(eq=False)
class RateLimits:
    """Buckets by key, so every instance and reply of one app shares one quota.

    Keys name what the platform meters, e.g. ``"dingtalk:<client id>"``.  The latest configuration
    wins: asking for an existing key with another rate or burst reconfigures the shared bucket (a
    reloaded instance file), while keeping the tokens it has already spent.
    """

    _buckets: dict[str, TokenBucket] = attrs.field(factory=dict, init=False)

    def bucket(self, key: str, rate: float, burst: float | None = None) -> TokenBucket:
        """The bucket for ``key``, created on first use; ``burst`` defaults to ``max(1, rate)``."""
        existing = self._buckets.get(key)
        if existing is None:
            existing = self._buckets[key] = TokenBucket(rate, burst)
        else:
            wanted = TokenBucket._validated(rate, burst)
            if wanted != (existing.rate, existing.burst):
                existing.configure(*wanted)
        return existing


#: The process-wide registry drivers use.
rate_limits = RateLimits()


def _retry_after(error: BaseException | None) -> float | None:
    """The usable ``retry_after`` of a :class:`RateLimited`: positive and finite, else ``None``.

    Drivers parse it from headers or bodies; a nonsensical value must not turn a rate-limit answer
    into a crash (or an endless pause) while the original error is being handled."""
    if not isinstance(error, RateLimited) or error.retry_after is None:
        return None
    hint = float(error.retry_after)
    return hint if hint > 0 and math.isfinite(hint) else None


async def call_with_retry(
    func: Callable[[], Awaitable[T]],
    *,
    retry_on: tuple[type[BaseException], ...] = (RetryableError,),
    attempts: int = 4,
    initial: float = 0.5,
    cap: float = 10.0,
    bucket: TokenBucket | None = None,
    on_outcome: Callable[[CallOutcome], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Call ``func()`` up to ``attempts`` times, retrying the exceptions in ``retry_on``.

    * With a ``bucket``, every attempt first waits for a token.
    * Backoff between attempts grows exponentially from ``initial`` seconds and never exceeds
      ``cap``; a random part (up to half of ``min(initial, cap)``, inside the cap) keeps callers
      that failed together from retrying together.
    * A :class:`~gateway.errors.RateLimited` with ``retry_after`` waits at least that long, and
      pauses ``bucket`` for that long, even if it is not retried, so *every* caller of the app
      backs off.
      A platform whose "too many requests" answer carries no hint leaves it to the driver to set
      ``retry_after`` when the limit is app-wide (DingTalk's ``QpsLimit``: about a second).
    * Anything not in ``retry_on`` propagates at once.  After the last attempt the original
      exception is re-raised (not wrapped).
    * ``on_outcome`` hears once about each attempt: ``"ok"``, ``"retried"`` / ``"rate_limited"``
      when another attempt follows, or ``"failed"`` when giving up.  Cancellation is not an
      outcome.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, not {attempts!r}")
    if initial < 0 or cap < 0:
        raise ValueError("initial and cap must not be negative")

    def report(outcome: CallOutcome) -> None:
        if on_outcome is not None:
            on_outcome(outcome)

    async def call() -> T:
        if bucket is not None:
            await bucket.acquire()
        try:
            return await func()
        except RateLimited as error:
            hint = _retry_after(error)
            if bucket is not None and hint is not None:
                bucket.pause(hint)
            raise

    # The first attempt runs without tenacity, and the retry machinery is built only when it failed:
    # nearly every call succeeds at once, and building it per call cost a measurable share of the
    # gateway's CPU under load.
    try:
        result: T = await call()
    except retry_on as error:
        if attempts == 1:
            report("failed")
            raise
        first_failure: list[BaseException] = [error]
    except Exception:
        report("failed")
        raise
    else:
        report("ok")
        return result

    # The jitter lives inside the cap, so ``cap`` is a true upper bound callers can plan with.
    jitter = min(initial, cap) / 2
    backoff = wait_exponential(multiplier=initial, max=cap - jitter) + wait_random(0, jitter)
    hint_jitter = wait_random(0, jitter)

    def wait(state: RetryCallState) -> float:
        delay = backoff(state)
        hint = _retry_after(state.outcome.exception() if state.outcome is not None else None)
        if hint is not None:
            delay = max(delay, hint + hint_jitter(state))
        return delay

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        report("rate_limited" if isinstance(error, RateLimited) else "retried")

    async def attempt() -> T:
        # Tenacity's first attempt replays the failure above, so its waits and reports are the
        # same as if it had made that call itself.
        if first_failure:
            raise first_failure.pop()
        return await call()

    retrying = AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait,
        retry=retry_if_exception_type(retry_on),
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=True,
    )
    try:
        result = await retrying(attempt)
    except Exception:
        report("failed")
        raise
    report("ok")
    return result
