"""Tests for gateway.ratelimit: token buckets in virtual time, the registry, and call_with_retry."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from gateway.errors import AuthenticationError, ConnectionLost, RateLimited, RetryableError
from gateway.ratelimit import RateLimits, TokenBucket, call_with_retry, rate_limits


class FakeTime:
    """Virtual time for one event loop.

    ``sleep`` parks the caller until :meth:`run` (or :meth:`advance`) moves the clock to its
    deadline; the clock only jumps when every task has gone idle, so code under test sees exactly
    the times it asked for and the tests never wait for real.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._parked: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        wake = asyncio.get_running_loop().create_future()
        heapq.heappush(self._parked, (self.now + max(0.0, delay), next(self._order), wake))
        await wake

    def bucket(self, rate: float, burst: float | None = None) -> TokenBucket:
        return TokenBucket(rate, burst, clock=self.clock, sleep=self.sleep)

    async def settle(self) -> None:
        """Let every runnable task run until it blocks (on a parked sleep or a future)."""
        for _ in range(50):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``, waking sleepers in deadline order."""
        end = self.now + seconds
        await self.settle()
        while self._parked and self._parked[0][0] <= end:
            self._wake_next()
            await self.settle()
        self.now = end

    async def run(self, *tasks: asyncio.Future[Any]) -> None:
        """Jump from deadline to deadline until all ``tasks`` are done."""
        await self.settle()
        while not all(task.done() for task in tasks):
            assert self._parked, "deadlock: tasks wait but nobody sleeps"
            self._wake_next()
            await self.settle()

    def _wake_next(self) -> None:
        when, _, wake = heapq.heappop(self._parked)
        self.now = max(self.now, when)
        if not wake.done():
            wake.set_result(None)


def spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    return asyncio.get_running_loop().create_task(coro)


async def timed_acquire(
    ft: FakeTime, bucket: TokenBucket, log: list[tuple[str, float]], name: str, tokens: float = 1
) -> None:
    await bucket.acquire(tokens)
    log.append((name, ft.now))


# --- TokenBucket -----------------------------------------------------------------------------


def test_defaults_and_validation() -> None:
    assert TokenBucket(20).burst == 20
    assert TokenBucket(0.5).burst == 1
    bucket = TokenBucket(2, 5)
    assert (bucket.rate, bucket.burst) == (2, 5)
    for rate, burst in [(0, None), (-1, None), (float("inf"), None), (float("nan"), None), (1, 0)]:
        with pytest.raises(ValueError):
            TokenBucket(rate, burst)


@pytest.mark.asyncio
async def test_invalid_token_count() -> None:
    bucket = TokenBucket(1)
    for tokens in (0, -1, float("nan")):
        with pytest.raises(ValueError):
            await bucket.acquire(tokens)


@pytest.mark.asyncio
async def test_starts_full_then_paces_at_rate() -> None:
    ft = FakeTime()
    bucket = ft.bucket(rate=10, burst=5)
    log: list[tuple[str, float]] = []

    async def many() -> None:
        for i in range(8):
            await timed_acquire(ft, bucket, log, str(i))

    await ft.run(spawn(many()))
    times = [t for _, t in log]
    assert times[:5] == [0, 0, 0, 0, 0]  # the burst, without any sleep
    assert times[5:] == pytest.approx([0.1, 0.2, 0.3])


@pytest.mark.asyncio
@pytest.mark.parametrize(("rate", "burst", "n"), [(20, None, 60), (3, 1, 10), (0.5, 2, 5)])
async def test_rate_over_a_window(rate: float, burst: float | None, n: int) -> None:
    ft = FakeTime()
    bucket = ft.bucket(rate, burst)
    log: list[tuple[str, float]] = []
    tasks = [spawn(timed_acquire(ft, bucket, log, str(i))) for i in range(n)]
    await ft.run(*tasks)
    assert ft.now == pytest.approx((n - bucket.burst) / rate)
    assert [name for name, _ in log] == [str(i) for i in range(n)]  # served in arrival order


@pytest.mark.asyncio
async def test_refills_while_idle_but_not_beyond_burst() -> None:
    ft = FakeTime()
    bucket = ft.bucket(rate=2, burst=3)
    log: list[tuple[str, float]] = []
    await ft.run(*[spawn(timed_acquire(ft, bucket, log, "drain")) for _ in range(3)])
    await ft.advance(100)  # an hour of quiet still only fills the bucket
    start = ft.now
    await ft.run(*[spawn(timed_acquire(ft, bucket, log, "again")) for _ in range(4)])
    assert [t - start for _, t in log[3:]] == pytest.approx([0, 0, 0, 0.5])


@pytest.mark.asyncio
async def test_big_waiter_is_not_starved_by_small_ones() -> None:
    ft = FakeTime()
    bucket = ft.bucket(rate=1, burst=3)
    log: list[tuple[str, float]] = []
    await bucket.acquire(3)  # empty now
    big = spawn(timed_acquire(ft, bucket, log, "big", 3))
    await ft.settle()
    smalls = [spawn(timed_acquire(ft, bucket, log, f"small{i}")) for i in range(3)]
    await ft.run(big, *smalls)
    # Without FIFO the small ones would get each token as it arrives and "big" would wait forever.
    assert log == [("big", 3), ("small0", 4), ("small1", 5), ("small2", 6)]


@pytest.mark.asyncio
async def test_newcomer_does_not_jump_the_queue_when_a_token_is_free() -> None:
    ft = FakeTime()
    bucket = ft.bucket(rate=1, burst=2)
    log: list[tuple[str, float]] = []
    await bucket.acquire(1)  # one token left, but the next waiter wants two
    big = spawn(timed_acquire(ft, bucket, log, "big", 2))
    await ft.settle()
    small = spawn(timed_acquire(ft, bucket, log, "small"))
    await ft.run(big, small)
    assert log == [("big", 1), ("small", 2)]


@pytest.mark.asyncio
async def test_cancelled_head_waiter_takes_nothing_and_blocks_nobody() -> None:
    ft = FakeTime()
    bucket = ft.bucket(rate=1, burst=1)
    log: list[tuple[str, float]] = []
    await bucket.acquire()
    first = spawn(timed_acquire(ft, bucket, log, "first"))  # sleeping on the clock
    await ft.settle()
    others = [spawn(timed_acquire(ft, bucket, log, name)) for name in ("second", "third")]
    await ft.advance(0.5)
    first.cancel()
    await ft.run(*others)
    assert first.cancelled()
    # "second" gets the token "first" would have had, at the same time; nothing was lost.
    assert log == [("second", 1), ("third", 2)]


@pytest.mark.asyncio
async def test_cancelled_queued_waiter_leaves_the_queue() -> None:
    ft = FakeTime()
    bucket = ft.bucket(rate=1, burst=1)
    log: list[tuple[str, float]] = []
    await bucket.acquire()
    tasks = {name: spawn(timed_acquire(ft, bucket, log, name)) for name in ("a", "b", "c")}
    await ft.settle()
    tasks["b"].cancel()
    await ft.run(tasks["a"], tasks["c"])
    assert log == [("a", 1), ("c", 2)]
    # The queue is empty again: with a full bucket, the fast path applies.
    await ft.advance(1)
    await bucket.acquire()
    assert ft.sleeps == [1.0, 1.0]


@pytest.mark.asyncio
async def test_cancelled_everyone_then_bucket_still_works() -> None:
    ft = FakeTime()
    bucket = ft.bucket(rate=1, burst=1)
    await bucket.acquire()
    tasks = [spawn(bucket.acquire()) for _ in range(3)]
    await ft.settle()
    for task in tasks:
        task.cancel()
    await ft.settle()
    log: list[tuple[str, float]] = []
    await ft.run(spawn(timed_acquire(ft, bucket, log, "later")))
    assert log == [("later", 1)]


@pytest.mark.asyncio
async def test_pause_blocks_everyone() -> None:
    ft = FakeTime()
    bucket = ft.bucket(rate=10, burst=5)  # full: 5 tokens at hand
    log: list[tuple[str, float]] = []
    bucket.pause(2)
    tasks = [spawn(timed_acquire(ft, bucket, log, str(i))) for i in range(3)]
    await ft.run(*tasks)
    times = [t for _, t in log]
    assert min(times) >= 2
    # The pause emptied the bucket: traffic resumes at the steady rate, not with a burst.
    assert times == pytest.approx([2.1, 2.2, 2.3])


@pytest.mark.asyncio
async def test_pause_extends_but_never_shortens() -> None:
    ft = FakeTime()
    bucket = ft.bucket(rate=10, burst=1)
    log: list[tuple[str, float]] = []
    bucket.pause(2)
    waiter = spawn(timed_acquire(ft, bucket, log, "w"))
    await ft.advance(1)
    bucket.pause(0.5)  # would end at 1.5: ignored
    bucket.pause(0)
    bucket.pause(-3)
    await ft.advance(0.9)
    assert not log
    bucket.pause(2)  # now ends at 3.9, while the waiter sleeps towards 2.1
    await ft.run(waiter)
    assert [name for name, _ in log] == ["w"]
    assert log[0][1] == pytest.approx(4.0)


def test_pause_must_be_finite() -> None:
    with pytest.raises(ValueError):
        TokenBucket(1).pause(float("inf"))


@pytest.mark.asyncio
async def test_configure_changes_rate_and_keeps_spent_tokens() -> None:
    ft = FakeTime()
    bucket = ft.bucket(rate=1, burst=4)
    await bucket.acquire(3)
    bucket.configure(10, 2)  # one token left; capacity now 2
    assert (bucket.rate, bucket.burst) == (10, 2)
    log: list[tuple[str, float]] = []
    await ft.run(*[spawn(timed_acquire(ft, bucket, log, str(i))) for i in range(3)])
    assert [t for _, t in log] == pytest.approx([0, 0.1, 0.2])


@pytest.mark.asyncio
async def test_request_above_burst_waits_for_full_bucket_and_leaves_debt() -> None:
    ft = FakeTime()
    bucket = ft.bucket(rate=1, burst=2)
    log: list[tuple[str, float]] = []
    await bucket.acquire(2)
    tasks = [
        spawn(timed_acquire(ft, bucket, log, "huge", 4)),
        spawn(timed_acquire(ft, bucket, log, "next")),
    ]
    await ft.run(*tasks)
    # "huge" gets in once the bucket is full (t=2) and owes 2 more: "next" waits those out too.
    assert log == [("huge", 2), ("next", 5)]


@pytest.mark.asyncio
async def test_real_time_sanity() -> None:
    bucket = TokenBucket(50, 1)
    start = time.monotonic()
    for _ in range(10):
        await bucket.acquire()
    assert time.monotonic() - start >= 0.15  # 9 waits of 20 ms


# --- RateLimits ------------------------------------------------------------------------------


def test_registry_shares_buckets_by_key() -> None:
    limits = RateLimits()
    a = limits.bucket("dingtalk:app1", 20)
    assert limits.bucket("dingtalk:app1", 20) is a
    assert limits.bucket("dingtalk:app2", 20) is not a
    assert isinstance(rate_limits, RateLimits)


def test_registry_latest_config_wins() -> None:
    limits = RateLimits()
    a = limits.bucket("app", 20)
    assert (a.rate, a.burst) == (20, 20)
    assert limits.bucket("app", 5) is a
    assert (a.rate, a.burst) == (5, 5)
    assert limits.bucket("app", 5, 2) is a
    assert (a.rate, a.burst) == (5, 2)
    with pytest.raises(ValueError):
        limits.bucket("app", 0)
    assert (a.rate, a.burst) == (5, 2)


# --- call_with_retry -------------------------------------------------------------------------


class Recorder:
    """A ``sleep`` that returns at once and remembers what it was asked to wait."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def failing(
    *errors: BaseException, result: str = "done"
) -> tuple[Callable[[], Awaitable[str]], list[int]]:
    """A call that raises ``errors`` one by one, then returns ``result``; and its call counter."""
    calls = [0]

    async def call() -> str:
        calls[0] += 1
        if calls[0] <= len(errors):
            raise errors[calls[0] - 1]
        return result

    return call, calls


@pytest.mark.asyncio
async def test_success_first_try() -> None:
    func, calls = failing()
    sleep, outcomes = Recorder(), list[str]()
    assert await call_with_retry(func, sleep=sleep, on_outcome=outcomes.append) == "done"
    assert calls == [1]
    assert outcomes == ["ok"]
    assert sleep.delays == []


@pytest.mark.asyncio
async def test_retries_then_succeeds() -> None:
    func, calls = failing(ConnectionLost("reset"), RetryableError("503"))
    sleep, outcomes = Recorder(), list[str]()
    assert await call_with_retry(func, sleep=sleep, on_outcome=outcomes.append) == "done"
    assert calls == [3]
    assert outcomes == ["retried", "retried", "ok"]
    assert len(sleep.delays) == 2


@pytest.mark.asyncio
async def test_non_retryable_propagates_at_once() -> None:
    for error in (AuthenticationError("bad secret"), ValueError("bug")):
        func, calls = failing(error)
        sleep, outcomes = Recorder(), list[str]()
        with pytest.raises(type(error)) as raised:
            await call_with_retry(func, sleep=sleep, on_outcome=outcomes.append)
        assert raised.value is error
        assert calls == [1]
        assert outcomes == ["failed"]
        assert sleep.delays == []


@pytest.mark.asyncio
async def test_retry_on_is_honoured() -> None:
    func, calls = failing(KeyError("x"), ConnectionLost("y"))
    with pytest.raises(ConnectionLost):
        await call_with_retry(func, retry_on=(KeyError,), sleep=Recorder())
    assert calls == [2]


@pytest.mark.asyncio
async def test_gives_up_after_attempts_with_the_original_exception() -> None:
    errors = [ConnectionLost(f"try {i}") for i in range(3)]
    func, calls = failing(*errors)
    sleep, outcomes = Recorder(), list[str]()
    with pytest.raises(ConnectionLost) as raised:
        await call_with_retry(func, attempts=3, sleep=sleep, on_outcome=outcomes.append)
    assert raised.value is errors[-1]
    assert calls == [3]
    assert outcomes == ["retried", "retried", "failed"]
    assert len(sleep.delays) == 2


@pytest.mark.asyncio
async def test_single_attempt_and_validation() -> None:
    func, calls = failing(ConnectionLost("x"))
    outcomes: list[str] = []
    with pytest.raises(ConnectionLost):
        await call_with_retry(func, attempts=1, sleep=Recorder(), on_outcome=outcomes.append)
    assert (calls, outcomes) == ([1], ["failed"])
    with pytest.raises(ValueError):
        await call_with_retry(func, attempts=0)


@pytest.mark.asyncio
async def test_backoff_grows_with_jitter_and_is_capped() -> None:
    func, _ = failing(*[ConnectionLost("x")] * 8)
    sleep = Recorder()
    with pytest.raises(ConnectionLost):
        await call_with_retry(func, attempts=8, initial=1, cap=5, sleep=sleep)
    # Exponential base 1, 2, 4, then the cap; jitter of up to min(initial, cap)/2 stays inside it.
    lows = [1, 2, 4, 4.5, 4.5, 4.5, 4.5]
    assert len(sleep.delays) == 7
    for delay, low in zip(sleep.delays, lows, strict=True):
        assert low <= delay <= min(low + 0.5, 5)
    assert max(sleep.delays) <= 5


@pytest.mark.asyncio
async def test_backoff_has_jitter() -> None:
    delays = set()
    for _ in range(5):
        func, _ = failing(ConnectionLost("x"))
        sleep = Recorder()
        await call_with_retry(func, sleep=sleep)
        delays.add(sleep.delays[0])
    assert len(delays) > 1
    assert all(0.5 <= d <= 0.75 for d in delays)


@pytest.mark.asyncio
async def test_rate_limited_respects_retry_after_and_pauses_the_bucket() -> None:
    ft = FakeTime()
    bucket = ft.bucket(rate=10, burst=10)
    func, calls = failing(RateLimited("QpsLimit", retry_after=3))
    sleep, outcomes = Recorder(), list[str]()
    log: list[tuple[str, float]] = []
    caller = spawn(call_with_retry(func, bucket=bucket, sleep=sleep, on_outcome=outcomes.append))
    await ft.settle()
    # Meanwhile another reply of the same app wants a token: it has to wait out the pause too.
    other = spawn(timed_acquire(ft, bucket, log, "other"))
    await ft.run(caller, other)
    assert caller.result() == "done"
    assert calls == [2]
    assert outcomes == ["rate_limited", "ok"]
    assert 3 <= sleep.delays[0] <= 3.25  # the hint, plus a little jitter
    assert log[0][1] >= 3  # nobody got a token during the pause
    assert ft.now >= 3


@pytest.mark.asyncio
async def test_retry_after_below_backoff_keeps_backoff() -> None:
    func, _ = failing(RateLimited("slow down", retry_after=0.01))
    sleep = Recorder()
    await call_with_retry(func, sleep=sleep)
    assert 0.5 <= sleep.delays[0] <= 0.75


@pytest.mark.asyncio
async def test_rate_limited_without_hint_does_not_pause() -> None:
    ft = FakeTime()
    bucket = ft.bucket(rate=10, burst=10)
    func, _ = failing(RateLimited("slow down"))
    outcomes: list[str] = []
    task = spawn(call_with_retry(func, bucket=bucket, sleep=Recorder(), on_outcome=outcomes.append))
    await ft.run(task)
    assert outcomes == ["rate_limited", "ok"]
    assert ft.sleeps == []  # two tokens from a full bucket, no pause


@pytest.mark.asyncio
async def test_last_rate_limited_attempt_still_pauses_the_bucket() -> None:
    ft = FakeTime()
    bucket = ft.bucket(rate=10, burst=10)
    error = RateLimited("QpsLimit", retry_after=2)
    func, _ = failing(error)
    outcomes: list[str] = []
    with pytest.raises(RateLimited) as raised:
        await call_with_retry(func, attempts=1, bucket=bucket, on_outcome=outcomes.append)
    assert raised.value is error
    assert outcomes == ["failed"]
    log: list[tuple[str, float]] = []
    await ft.run(spawn(timed_acquire(ft, bucket, log, "after")))
    assert log[0][1] >= 2  # the others back off even though this caller gave up


@pytest.mark.asyncio
async def test_bad_retry_after_is_ignored() -> None:
    bucket = TokenBucket(10)
    for hint in (float("inf"), float("nan"), -1.0, 0.0):
        func, calls = failing(RateLimited("x", retry_after=hint))
        sleep = Recorder()
        assert await call_with_retry(func, bucket=bucket, sleep=sleep) == "done"
        assert calls == [2]
        assert 0.5 <= sleep.delays[0] <= 0.75


@pytest.mark.asyncio
async def test_each_attempt_takes_a_token() -> None:
    ft = FakeTime()
    bucket = ft.bucket(rate=1, burst=1)
    attempt_times: list[float] = []

    async def call() -> str:
        attempt_times.append(ft.now)
        if len(attempt_times) < 3:
            raise ConnectionLost("x")
        return "done"

    task = spawn(call_with_retry(call, bucket=bucket, sleep=Recorder()))
    await ft.run(task)
    assert task.result() == "done"
    assert attempt_times == [0, 1, 2]


@pytest.mark.asyncio
async def test_cancellation_is_not_an_outcome() -> None:
    started = asyncio.Event()

    async def hang() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    outcomes: list[str] = []
    task = spawn(call_with_retry(hang, on_outcome=outcomes.append))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert outcomes == []
