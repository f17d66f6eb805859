"""Error answers and injected faults: ``fail_next`` plans, the per-app, per-API QPS window, and
raw frames (hostile input)."""

from __future__ import annotations

import collections
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from gateway_dingtalk.emulator._records import EmulatorError

if TYPE_CHECKING:
    from gateway_dingtalk.emulator._server import DingTalkEmulator
    from gateway_dingtalk.emulator._stream import _Push

__all__ = [
    "ApiError",
    "Fault",
    "FaultPlan",
    "QpsWindow",
    "default_error",
    "push_raw_frame",
    "request_id",
]

QPS_LIMIT_CODE = "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"
QPS_LIMIT_MESSAGE = "您的企业应用调用钉钉开放平台当前接口的所有请求都被暂时禁用了"

# What DingTalk answers for a status when a fault gives no code (research doc §3.1).
_DEFAULTS: dict[int, tuple[str, str]] = {
    400: ("InvalidAuthentication", "不合法的access_token"),
    401: ("Unauthorized", "未授权"),
    403: (QPS_LIMIT_CODE, QPS_LIMIT_MESSAGE),
    429: ("system.busy", "system busy, request too frequest"),
    500: ("unknownError", "未知错误"),
    503: ("ServiceUnavailable", "服务暂不可用"),
}


def default_error(status: int) -> tuple[str, str]:
    return _DEFAULTS.get(status, ("unknownError", "未知错误"))


def request_id() -> str:
    return str(uuid.uuid4()).upper()


class ApiError(Exception):
    """An OpenAPI error answer: ``{"code", "message", "requestid"}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "requestid": request_id()}


@attrs.define
class Fault:
    path_prefix: str
    remaining: int
    status: int
    code: str
    message: str


@attrs.define
class FaultPlan:
    """Faults queued by ``fail_next``; the oldest matching one answers the next request."""

    faults: list[Fault] = attrs.field(factory=list)

    def add(self, path_prefix: str, count: int, status: int, code: str, message: str) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.faults.append(Fault(path_prefix, count, status, code, message))

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


class QpsWindow:
    """At most ``limit`` accepted calls per (app, API) in any sliding 1-second window.

    Rejected calls do not count against the window (DingTalk blocks, it does not queue)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._calls: dict[tuple[str, str], collections.deque[float]] = {}

    def admit(self, app: str, api: str, limit: float) -> bool:
        now = self._clock()
        calls = self._calls.setdefault((app, api), collections.deque())
        while calls and now - calls[0] >= 1.0:
            calls.popleft()
        if len(calls) >= limit:
            return False
        calls.append(now)
        return True


async def push_raw_frame(
    emulator: DingTalkEmulator, text: str, *, frame_id: str | None = None, app: str | None = None
) -> _Push:
    """Send ``text`` as one websocket text message, as is (any frame, JSON or not, of any size),
    once (never redelivered), on a live connection of ``app``.  With ``frame_id``, an ack frame
    whose ``headers.messageId`` is ``frame_id`` is this push's (``_Push.ack``, also in
    ``emulator.acks``; give a fresh id, as acks match the first push of an id on a connection).
    Unlike :meth:`DingTalkEmulator.push_frame`, the caller says which id an ack would carry,
    whatever the text holds.  Hostile-input tests only: a platform never sends such frames."""
    from gateway_dingtalk.emulator._stream import _Push  # here: _stream imports this module

    stream = emulator._stream
    app = app or emulator.default_app
    live = stream.choose([c for c in stream.live_of(app) if not c.conn.draining])
    if live is None:
        raise EmulatorError(f"no live connection of {app}")
    push = _Push(frame_id or "", live.conn.id, "RAW", "", "raw", time.monotonic())
    if frame_id is not None:
        stream.pushes.setdefault(frame_id, []).append(push)
    try:
        await live.ws.send_str(text)
    except (ConnectionError, RuntimeError) as exc:
        if frame_id is not None:
            stream.pushes[frame_id].remove(push)
        raise EmulatorError(f"connection {live.conn.id} went away: {exc}") from exc
    return push
