"""The reconnect contract, with a scripted driver session and zero real waits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from gateway.config import ReconnectSettings
from gateway.errors import AuthenticationError, ConnectionLost, DriverConfigError
from gateway.logs import instance_logger
from gateway.supervisor import InstanceState, InstanceStatus, Supervisor

SETTINGS = ReconnectSettings(initial_delay=1.0, max_delay=60.0, healthy_after=30.0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Script:
    """Each attempt: optionally report connected, stay up for `up` seconds (fake time), raise."""

    def __init__(self, clock: Clock, steps: list[tuple[bool, float, BaseException]]) -> None:
        self.clock = clock
        self.steps = steps
        self.attempts = 0
        self.supervisor: Supervisor | None = None

    async def serve(self) -> None:
        assert self.supervisor is not None
        if self.attempts == len(self.steps):
            raise asyncio.CancelledError  # end of script: stop the loop
        connected, up, exc = self.steps[self.attempts]
        self.attempts += 1
        if connected:
            self.supervisor.connected()
        self.clock.now += up
        raise exc


def run(steps: list[tuple[bool, float, BaseException]], jitter: Callable[[], float] = lambda: 1.0):
    clock = Clock()
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)

    script = Script(clock, steps)
    status = InstanceStatus(driver="test")
    supervisor = Supervisor(
        script.serve,
        status,
        SETTINGS,
        instance_logger("t"),
        sleep=sleep,
        clock=clock,
        jitter=jitter,
    )
    script.supervisor = supervisor
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(supervisor.run())
    return delays, status, script


def test_healthy_session_that_is_lost_reconnects_at_once() -> None:
    delays, status, _ = run([(True, 3600, ConnectionLost("server said disconnect"))] * 3)
    assert delays == [0.0, 0.0, 0.0]
    assert status.reconnects == 3


def test_failures_back_off_exponentially_up_to_the_cap_and_never_give_up() -> None:
    delays, status, script = run([(False, 0, OSError("refused"))] * 10)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    assert script.attempts == 10
    assert status.state is InstanceState.RECONNECTING
    assert status.last_error == "OSError: refused"


def test_jitter_keeps_the_first_retry_within_a_second() -> None:
    delays, _, _ = run([(False, 0, OSError("x"))] * 3, jitter=lambda: 0.0)
    assert delays == [0.5, 1.0, 2.0]


def test_short_lived_sessions_count_as_failures() -> None:
    # Connected, but dropped after 5 s each time: a flapping server must not be hammered.
    delays, _, _ = run([(True, 5, ConnectionLost("dropped"))] * 4)
    assert delays == [1, 2, 4, 8]


def test_a_healthy_session_resets_the_backoff() -> None:
    steps = [(False, 0, OSError("x"))] * 3 + [(True, 100, OSError("reset by peer"))]
    steps += [(False, 0, OSError("x"))]
    delays, _, _ = run(steps)
    # After the healthy session, a non-ConnectionLost failure starts the backoff from the beginning.
    assert delays == [1, 2, 4, 1, 2]


def test_authentication_errors_are_logged_once_and_retried_with_capped_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    delays, status, _ = run([(False, 0, AuthenticationError("credentials rejected for app x"))] * 8)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    assert status.state is InstanceState.FAILED
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "credentials rejected" in errors[0].getMessage()


def test_config_error_then_recovery() -> None:
    steps = [
        (False, 0, DriverConfigError("unknown robot")),
        (True, 100, ConnectionLost("bye")),
    ]
    delays, status, _ = run(steps)
    assert delays == [1, 0.0]
    assert status.state is InstanceState.RECONNECTING


def test_serve_returning_without_close_is_treated_as_a_lost_connection() -> None:
    calls = 0

    async def serve() -> None:
        nonlocal calls
        calls += 1
        if calls > 2:
            raise asyncio.CancelledError

    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)

    supervisor = Supervisor(serve, InstanceStatus("t"), SETTINGS, instance_logger("t"), sleep=sleep)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(supervisor.run())
    assert calls == 3 and len(delays) == 2


def test_stopping_ends_the_loop_quietly() -> None:
    async def main() -> None:
        stop = asyncio.Event()
        supervisor: Supervisor

        async def serve() -> None:
            supervisor.connected()
            await stop.wait()
            raise ConnectionLost("closed by us")

        supervisor = Supervisor(serve, InstanceStatus("t"), SETTINGS, instance_logger("t"))
        task = asyncio.create_task(supervisor.run())
        await asyncio.sleep(0)
        supervisor.stopping = True
        stop.set()
        await asyncio.wait_for(task, 1)

    asyncio.run(main())
