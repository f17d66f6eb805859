"""The reconnect contract: the core's retry loop around a driver's ``serve()``.

* A session that was healthy (connected for at least ``healthy_after``) and ended with
  ``ConnectionLost`` is reconnected at once: server-side disconnects are routine.
* Anything else — a short-lived session, a failure to connect, an unexpected exception — is retried
  with exponential backoff and jitter (first retry within ``initial_delay``, capped at ``max_delay``),
  forever: a bot that gives up is a bot that is silent the next morning.
* ``AuthenticationError``/``DriverConfigError`` are logged clearly once (again only if the message
  changes) and retried with the same capped backoff, so a fixed secret recovers without a restart.
* A healthy session resets the backoff.

The loop is tenacity's; the delay comes from our own bookkeeping because "reset after a healthy
session" depends on what happened inside the attempt, not on the attempt count.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable

import attrs
import tenacity

from gateway.config.instance import ReconnectSettings
from gateway.errors import AuthenticationError, ConnectionLost, DriverConfigError

__all__ = ["InstanceState", "InstanceStatus", "Supervisor"]


class InstanceState(enum.StrEnum):
    STARTING = "starting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    FAILED = "failed"  # the last attempt failed with an error that needs a fix (auth, config)
    STOPPING = "stopping"  # draining: no new messages, the answers in flight finish
    STOPPED = "stopped"


@attrs.define
class InstanceStatus:
    """What the operator sees of one instance (health endpoints, ``gateway status``)."""

    driver: str
    state: InstanceState = InstanceState.STARTING
    connected_since: float | None = None  # epoch seconds
    last_frame: float | None = None
    reconnects: int = 0
    last_error: str = ""
    in_flight: int = 0
    denied: int = 0  # messages refused by access control


class Supervisor:
    """Runs ``serve`` until cancelled, following the reconnect contract."""

    def __init__(
        self,
        serve: Callable[[], Awaitable[None]],
        status: InstanceStatus,
        settings: ReconnectSettings,
        logger: logging.LoggerAdapter[logging.Logger],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._serve = serve
        self.status = status
        self._settings = settings
        self._log = logger
        self._sleep = sleep
        self._clock = clock
        self._jitter = jitter
        self._failures = 0
        self._connected_at: float | None = None
        self._next_delay = 0.0
        self._reported_error = ""
        self.stopping = False

    def connected(self) -> None:
        """Called by the driver (through its context) once its session is up."""
        self._connected_at = self._clock()
        self._set_state(InstanceState.CONNECTED)
        self.status.connected_since = time.time()
        self._reported_error = ""
        self._log.info("connected", extra={"event": "connected"})

    def _set_state(self, state: InstanceState) -> None:
        # A draining instance still (re)connects so its answers can be delivered, but it must keep
        # showing "stopping": readiness and `gateway status` would call it healthy otherwise.
        if self.status.state is not InstanceState.STOPPING:
            self.status.state = state

    async def run(self) -> None:
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(Exception),
            wait=lambda _state: self._next_delay,
            stop=tenacity.stop_never,
            sleep=self._sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        await retrying(self._attempt)

    async def _attempt(self) -> None:
        self._connected_at = None
        try:
            await self._serve()
        except Exception as exc:
            if self.stopping:
                return
            self._after_failure(exc)
            raise
        if not self.stopping:
            # serve() must not return by itself; treat it as a lost connection rather than stop.
            lost = ConnectionLost("the driver's serve() returned without being closed")
            self._after_failure(lost)
            raise lost

    def _after_failure(self, exc: Exception) -> None:
        up = None if self._connected_at is None else self._clock() - self._connected_at
        healthy = up is not None and up >= self._settings.healthy_after
        if healthy:
            self._failures = 0
        if healthy and isinstance(exc, ConnectionLost):
            self._next_delay = 0.0
        else:
            self._failures += 1
            ceiling = self._settings.initial_delay * 2 ** (self._failures - 1)
            ceiling = min(self._settings.max_delay, ceiling)
            # "Equal jitter": between half and all of the ceiling, so the first retry is within
            # initial_delay and a fleet of gateways does not reconnect in lockstep.
            self._next_delay = ceiling * (0.5 + self._jitter() / 2)

        self.status.connected_since = None
        self.status.last_error = f"{type(exc).__name__}: {exc}"
        needs_fix = isinstance(exc, AuthenticationError | DriverConfigError)
        self._set_state(InstanceState.FAILED if needs_fix else InstanceState.RECONNECTING)
        if needs_fix:
            if str(exc) != self._reported_error:
                self._reported_error = str(exc)
                self._log.error(
                    "%s (retrying every %g s at most until fixed)",
                    exc,
                    self._settings.max_delay,
                    extra={"event": "auth_failed"},
                )
        elif isinstance(exc, ConnectionLost):
            self._log.warning("connection lost: %s", exc, extra={"event": "connection_lost"})
        else:
            self._log.warning(
                "connection failed: %s: %s",
                type(exc).__name__,
                exc,
                extra={"event": "connect_failed"},
            )
            self._log.debug("connection failure details", exc_info=exc)

    def _before_sleep(self, retry_state: tenacity.RetryCallState) -> None:
        self.status.reconnects += 1
        if self._next_delay:
            self._log.info("reconnecting in %.2f s", self._next_delay, extra={"event": "backoff"})
        else:
            self._log.info("reconnecting now", extra={"event": "reconnect"})
