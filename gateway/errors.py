"""Every error the gateway raises on purpose.

::

    GatewayError
    ├── ConfigError              one or more problems in config files (all reported at once)
    ├── PluginError              a driver or agent plugin could not be found or loaded
    ├── ShuttingDown             the gateway no longer accepts messages; do not ACK
    ├── AgentError               the agent failed; the text is shown to the user
    │   └── AgentTimeout         the agent took too long (in total or between chunks)
    ├── AccessDenied             the access-control hook refused a message
    ├── RequestConflict          an outbound request's idempotency key is busy or was used otherwise
    └── DriverError              a driver's session with its platform ended or failed
        ├── SendRejected         the platform refused a proactive message (unknown target, ...)
        ├── AuthenticationError  credentials rejected: logged once, retried with capped backoff
        ├── DriverConfigError    the settings cannot work (bad endpoint, ...): like AuthenticationError
        └── RetryableError       transient: the supervisor (or `call_with_retry`) tries again
            ├── ConnectionLost   a session that was up ended (server disconnect, dead socket)
            └── RateLimited      the platform said "too many requests"; may carry `retry_after`

Drivers wrap library exceptions at their boundary (``raise ConnectionLost(...) from exc``), so the
core only ever has to reason about this tree.  Messages never contain secrets.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

__all__ = [
    "AccessDenied",
    "AgentError",
    "AgentTimeout",
    "AuthenticationError",
    "ConfigError",
    "ConfigProblem",
    "ConnectionLost",
    "DriverConfigError",
    "DriverError",
    "GatewayError",
    "PluginError",
    "RateLimited",
    "RequestConflict",
    "RetryableError",
    "SendRejected",
    "ShuttingDown",
]


class GatewayError(Exception):
    """Root of the gateway's own errors."""


@attrs.frozen
class ConfigProblem:
    """One problem in one file: where it is and what was expected."""

    file: str
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return f"{where}: {self.message}"


class ConfigError(GatewayError):
    """Invalid configuration.  Carries every problem found, not just the first."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class PluginError(GatewayError):
    """A plugin is unknown or failed to load; ``name`` and ``group`` say which."""

    def __init__(self, message: str, *, group: str, name: str) -> None:
        super().__init__(message)
        self.group = group
        self.name = name


class ShuttingDown(GatewayError):
    """Raised by ``DriverContext.deliver`` while stopping: the driver must not ACK the message."""


class AgentError(GatewayError):
    """The agent could not answer.  ``str(error)`` is readable by the chat user."""


class AgentTimeout(AgentError):
    """The agent exceeded its total or idle-between-chunks time limit."""


class AccessDenied(GatewayError):
    """The access-control hook refused the message; ``str(error)`` may be shown to the sender."""


class RequestConflict(GatewayError):
    """An outbound message's idempotency key belongs to a request still in progress (or interrupted,
    outcome unknown), or to a different message.  Nothing was sent."""


class DriverError(GatewayError):
    """A driver's session failed.  Raised out of ``Driver.serve`` to the supervisor."""


class SendRejected(DriverError):
    """The platform refused a proactive message for a reason retrying cannot fix (unknown
    conversation or user, robot not in the group, text refused).  The text is shown to the caller."""


class AuthenticationError(DriverError):
    """The platform rejected the credentials.  Not retried quickly: it needs a fix."""


class DriverConfigError(DriverError):
    """The driver's settings cannot work (unreachable endpoint, unknown robot...)."""


class RetryableError(DriverError):
    """A transient failure worth retrying."""


class ConnectionLost(RetryableError):
    """A connection that had been established ended.  Reconnect at once if it was healthy."""


class RateLimited(RetryableError):
    """The platform throttled us.  ``retry_after`` is its hint in seconds, if it gave one."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
