"""Error answers, injected faults (``fail_next``) and the sliding-window rate limits.

Codes are Feishu's documented ones (open.feishu.cn, "通用错误码" and each API's error table):
99991661 missing token, 99991663 invalid/expired tenant token, 99991400 frequency limit (HTTP 429
with ``x-ogw-ratelimit-*`` headers), 230020 per-chat send limit, CardKit 3003xx/2007xx.
"""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import Callable, Hashable

import attrs

__all__ = [
    "INVALID_TOKEN",
    "MISSING_TOKEN",
    "RATE_LIMITED",
    "ApiError",
    "Fault",
    "FaultPlan",
    "RateWindow",
    "log_id",
]

MISSING_TOKEN = 99991661
INVALID_TOKEN = 99991663
RATE_LIMITED = 99991400

_TOKEN_HINT = "Please make a request with token attached."


def log_id() -> str:
    """A Feishu-style request log id (``X-Tt-Logid``)."""
    return time.strftime("%Y%m%d%H%M%S") + secrets.token_hex(10).upper()


class ApiError(Exception):
    """An OpenAPI error answer: ``{"code", "msg", "error": {"log_id"}}`` with an HTTP status."""

    def __init__(
        self, status: int, code: int, msg: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {msg}")
        self.status = status
        self.code = code
        self.msg = msg
        self.headers = dict(headers or {})

    def body(self) -> dict[str, object]:
        return {"code": self.code, "msg": self.msg, "error": {"log_id": log_id()}}

    @classmethod
    def missing_token(cls) -> ApiError:
        return cls(400, MISSING_TOKEN, f"Missing access token for authorization. {_TOKEN_HINT}")

    @classmethod
    def invalid_token(cls) -> ApiError:
        return cls(400, INVALID_TOKEN, f"Invalid access token for authorization. {_TOKEN_HINT}")

    @classmethod
    def rate_limited(cls, limit: float) -> ApiError:
        return cls(
            429,
            RATE_LIMITED,
            "request trigger frequency limit",
            headers={"x-ogw-ratelimit-limit": str(int(limit)), "x-ogw-ratelimit-reset": "1"},
        )

    @classmethod
    def invalid_param(cls, detail: str, code: int = 10002) -> ApiError:
        return cls(400, code, f"Your request contains an invalid request parameter. {detail}")


@attrs.define
class Fault:
    path_prefix: str
    remaining: int
    status: int
    code: int
    msg: str


@attrs.define
class FaultPlan:
    """Faults queued by ``fail_next``; the oldest matching one answers the next request."""

    faults: list[Fault] = attrs.field(factory=list)

    def add(self, fault: Fault) -> None:
        if fault.remaining < 1:
            raise ValueError("count must be at least 1")
        self.faults.append(fault)

    def take(self, path: str) -> Fault | None:
        for fault in self.faults:
            if path.startswith(fault.path_prefix):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    def clear(self) -> None:
        self.faults.clear()


class RateWindow:
    """At most ``limit`` accepted calls per key in any sliding ``window``-second window.  Rejected
    calls do not count (Feishu refuses, it does not queue)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._calls: dict[Hashable, collections.deque[float]] = {}

    def admit(self, key: Hashable, limit: float, window: float = 1.0) -> bool:
        now = self._clock()
        calls = self._calls.setdefault((key, window), collections.deque())
        while calls and now - calls[0] >= window:
            calls.popleft()
        if len(calls) >= limit:
            return False
        calls.append(now)
        return True
