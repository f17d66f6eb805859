"""Error answers, injected faults (``fail_next``), the sliding-window rate limits and raw frames.

Codes are Feishu's documented ones (open.feishu.cn, "通用错误码" and each API's error table):
99991661 missing token, 99991663 invalid/expired tenant token, 99991400 frequency limit (HTTP 429
with ``x-ogw-ratelimit-*`` headers), 230020 per-chat send limit, CardKit 3003xx/2007xx.
"""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

import attrs

from gateway_feishu.emulator._records import AckRecord, EmulatorError

if TYPE_CHECKING:
    from gateway_feishu.emulator._server import FeishuEmulator

__all__ = [
    "INVALID_TOKEN",
    "MISSING_TOKEN",
    "RATE_LIMITED",
    "ApiError",
    "Fault",
    "FaultPlan",
    "RateWindow",
    "RawFramePush",
    "log_id",
    "push_raw_frame",
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


# -- raw frames (hostile input) -------------------------------------------------------------------


@attrs.define(eq=False)
class RawFramePush:
    """One :func:`push_raw_frame`: the ACK a client wrote back for it, if any (read it later)."""

    frame_id: str | None
    connection_id: str
    sent_at: float
    #: the ACK frame matched to this push (its ``message_id`` header), set when it arrives
    ack: AckRecord | None = None
    #: no event behind it (the long connection's pushes carry theirs here)
    outbound: None = None


async def push_raw_frame(
    emulator: FeishuEmulator,
    data: bytes,
    *,
    frame_id: str | None = None,
    app: str | None = None,
    wait_connection: float = 5.0,
) -> RawFramePush:
    """Send ``data`` as one websocket binary message, as is (no pbbp2 encoding: any bytes, a
    frame with any headers, a part of a multi-part payload), once (never re-pushed), on a random
    live connection of ``app``.  With ``frame_id``, a DATA frame written back with that
    ``message_id`` on that connection is this push's ACK (``RawFramePush.ack``, also in
    ``emulator.acks``) instead of an ``unknown_ack`` violation.  Hostile-input tests only: a
    platform never sends such frames."""
    longconn = emulator._longconn
    live = await longconn.wait_live(app or emulator.default_app, wait_connection)
    push = RawFramePush(frame_id, live.conn.id, time.monotonic())
    if frame_id is not None:
        # Shaped like the long connection's own pushes (``sent_at``, ``outbound``, ``ack``), so
        # its ACK handling matches and records the ACK as for any frame.
        live.pushes[frame_id] = push  # type: ignore[assignment]
    async with live.send_lock:
        try:
            await live.ws.send_bytes(data)
        except (ConnectionError, RuntimeError) as exc:
            raise EmulatorError(f"connection {live.conn.id} went away: {exc}") from exc
    return push
