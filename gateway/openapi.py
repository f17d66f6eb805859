"""Building blocks of a driver's OpenAPI client: the app's access token, one JSON exchange, the
retry schedule (:class:`OpenApiClient`), and the error for what the platform refuses for good.

What a platform's answers mean (which codes are transient, which mean a bad token) stays in the
driver; these pieces only do what every platform's client does the same way.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, TypeVar

import aiohttp

from gateway.errors import DriverError, RetryableError
from gateway.ratelimit import CallOutcome, TokenBucket, call_with_retry
from gateway.secrets import Secret

__all__ = [
    "TOKEN_MARGIN",
    "AccessToken",
    "OpenApiClient",
    "OpenApiError",
    "TokenRejected",
    "exchange_json",
]

#: Refresh this long before the platform's expiry, so a token never expires mid-call.
TOKEN_MARGIN = 300.0

T = TypeVar("T")
SettingsT = TypeVar("SettingsT")


class OpenApiError(DriverError):
    """The platform refused a call for a reason retrying cannot fix (bad parameter, missing
    permission).  ``code`` is the platform's own (a string on DingTalk, a number on Feishu)."""

    def __init__(self, message: str, *, path: str, status: int, code: Any) -> None:
        super().__init__(message)
        self.path = path
        self.status = status
        self.code = code


class TokenRejected(RetryableError):
    """The access token was not accepted: it is dropped, and the retry fetches a new one."""


class AccessToken:
    """One app's access token, shared by all its calls: fetched once for all the callers that find
    it missing or near its expiry (no stampede on the token endpoint), and kept as a short-lived
    :class:`~gateway.secrets.Secret` so the log redactor masks it wherever it shows up."""

    def __init__(self, fetch: Callable[[], Awaitable[tuple[str, float]]]) -> None:
        """``fetch()`` asks the platform: (token, lifetime in seconds)."""
        self._fetch = fetch
        self._token: Secret | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> str:
        if self._token and time.monotonic() < self._expires:
            return self._token.reveal()
        async with self._lock:
            if self._token and time.monotonic() < self._expires:
                return self._token.reveal()
            token, lifetime = await self._fetch()
            self._token = Secret(token, short_lived=True)
            # Half the lifetime at least: a platform that hands out short tokens still gets reuse.
            self._expires = time.monotonic() + max(lifetime - TOKEN_MARGIN, lifetime / 2)
            return token

    def invalidate(self, token: str) -> None:
        """Drop ``token`` if it is still the current one (a concurrent call may have renewed it)."""
        if self._token is not None and self._token.reveal() == token:
            self._token = None


async def exchange_json(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Mapping[str, Any] | None,
    *,
    label: str,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
) -> tuple[int, Any, Mapping[str, str]]:
    """One JSON request: (HTTP status, parsed body or None, response headers).  Network failures
    and timeouts become :class:`RetryableError` (``"<label> unreachable: ..."``); everything else
    is the caller's to judge."""
    try:
        async with session.request(
            method,
            url,
            json=body,
            params=params,
            headers={**(headers or {}), "Accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            try:
                data = await response.json(content_type=None)
            except ValueError:
                data = None
            return response.status, data, response.headers
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RetryableError(f"{label} unreachable: {type(exc).__name__}: {exc}") from exc


class OpenApiClient(abc.ABC, Generic[SettingsT]):
    """One app's OpenAPI client, the parts every platform's has: its settings, the driver's
    session (the client owns none: the driver passes the one it keeps), the app's bucket, the
    access token and the outcome of every call.  A platform's client says how a token is fetched
    and what its answers mean."""

    def __init__(
        self,
        settings: SettingsT,
        session: Callable[[], aiohttp.ClientSession],
        bucket: TokenBucket,
        logger: logging.LoggerAdapter[logging.Logger],
        on_outcome: Callable[[CallOutcome], None],
    ) -> None:
        self._settings = settings
        self._session = session
        self._bucket = bucket
        self._log = logger
        self._on_outcome = on_outcome
        self._token = AccessToken(self._fetch_token)

    @abc.abstractmethod
    async def _fetch_token(self) -> tuple[str, float]:
        """Ask the platform for a token: (token, lifetime in seconds)."""

    async def token(self) -> str:
        """The app's access token, fetched once for all the callers that found it missing."""
        return await self._token.get()

    async def _authorized(self, attempt: Callable[[str], Awaitable[T]]) -> T:
        """``attempt(token)`` with the app's access token; when it raises :class:`TokenRejected`,
        that token is dropped (unless renewed meanwhile) before the error goes on to the retry."""
        token = await self.token()
        try:
            return await attempt(token)
        except TokenRejected:
            self._token.invalidate(token)
            raise

    async def _retried(self, once: Callable[[], Awaitable[T]]) -> T:
        """``once()`` through the app's bucket, retried on what is transient: 5 attempts, backoff
        from 0.5 s capped at 8 s (a platform's rate window is a second or a minute), each outcome
        reported."""
        return await call_with_retry(
            once, bucket=self._bucket, on_outcome=self._on_outcome, attempts=5, initial=0.5, cap=8.0
        )
