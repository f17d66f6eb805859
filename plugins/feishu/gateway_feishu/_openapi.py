"""Feishu's OpenAPI over aiohttp: the tenant token, errors mapped to the core's tree, quota, retries.

Every call is async with a timeout, takes a token from the app's shared bucket (Feishu meters calls
per app, whichever instance or reply makes them), and goes through the core's ``call_with_retry``,
which retries what is transient:

* HTTP 429 and Feishu's frequency-limit codes: :class:`~gateway.errors.RateLimited`, with the
  ``x-ogw-ratelimit-reset`` hint when Feishu sends one (the whole app then pauses);
* an expired or invalid tenant token (99991661/99991663/99991668/99991677): the token is dropped,
  so the retry fetches a new one;
* HTTP 5xx, a non-JSON body (a gateway error page) and network errors.

Anything else Feishu refuses (missing permission, bad parameter, recipient unknown) is an
:class:`OpenApiError` carrying Feishu's ``code``; retrying it cannot help.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from gateway.errors import AuthenticationError, DriverError, RateLimited, RetryableError
from gateway.ratelimit import CallOutcome, TokenBucket, call_with_retry
from gateway_feishu.settings import FeishuSettings

__all__ = ["OpenApi", "OpenApiError"]

TOKEN_PATH = "/open-apis/auth/v3/tenant_access_token/internal"
# Refresh this long before Feishu's expiry, so a token never expires mid-call.
_TOKEN_MARGIN = 300.0
_TOKEN_CODES = frozenset({99991661, 99991663, 99991668, 99991677})
# 99991400: the app's frequency limit; 230020: too many messages to one chat; 11232: too many
# messages from the app; 300305/300315: a card entity's update rate (10 ops/s).
_RATE_CODES = frozenset({99991400, 230020, 11232, 300305, 300315})
# Feishu's codes for "the app id or secret is wrong" at the token endpoint.
_CREDENTIAL_CODES = frozenset({10003, 10014, 10015})


class OpenApiError(DriverError):
    """Feishu refused a call for a reason retrying cannot fix (bad parameter, missing permission)."""

    def __init__(self, path: str, status: int, code: int, message: str) -> None:
        super().__init__(f"Feishu {path} failed: HTTP {status}, code {code}: {message}")
        self.path = path
        self.status = status
        self.code = code


class _TokenRejected(RetryableError):
    """The tenant token was not accepted: fetch a new one and try again."""


class OpenApi:
    """One app's OpenAPI client.  Owns no session: the driver passes the one it keeps."""

    def __init__(
        self,
        settings: FeishuSettings,
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
        self._token = ""
        self._token_expires = 0.0
        self._token_lock = asyncio.Lock()

    @property
    def base(self) -> str:
        return self._settings.base_url

    async def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """An authenticated call, retried when transient; returns the ``data`` of Feishu's answer.

        Every attempt sends the same body: a CardKit operation keeps its ``uuid`` and ``sequence``,
        so an attempt that landed unseen is recognised as a replay instead of applied twice."""

        async def once() -> dict[str, Any]:
            token = await self.token()
            headers = {"Authorization": f"Bearer {token}"}
            try:
                return await self._request(method, path, body, headers, params)
            except _TokenRejected:
                self._invalidate(token)
                raise

        result: dict[str, Any] = await call_with_retry(
            once, bucket=self._bucket, on_outcome=self._on_outcome, attempts=5, initial=0.5, cap=8.0
        )
        return result

    async def token(self) -> str:
        """The tenant access token, fetched once for all the callers that found it missing."""
        if self._token and time.monotonic() < self._token_expires:
            return self._token
        async with self._token_lock:
            if self._token and time.monotonic() < self._token_expires:
                return self._token
            body = {
                "app_id": self._settings.app_id,
                "app_secret": self._settings.app_secret.reveal(),
            }
            status, data, _ = await self.exchange("POST", TOKEN_PATH, body)
            code = data.get("code") if isinstance(data, dict) else None
            token = data.get("tenant_access_token") if isinstance(data, dict) else None
            if code in _CREDENTIAL_CODES or (status in (400, 401, 403) and code != 0):
                raise AuthenticationError(
                    f"Feishu rejected the app id/secret of app {self._settings.app_id} "
                    f"(code {code})"
                )
            if code != 0 or not isinstance(token, str) or not token:
                raise RetryableError(f"Feishu {TOKEN_PATH}: HTTP {status}, code {code}")
            lifetime = float(data.get("expire", 7200))
            self._token = token
            self._token_expires = time.monotonic() + max(lifetime - _TOKEN_MARGIN, lifetime / 2)
            return token

    def _invalidate(self, token: str) -> None:
        if self._token == token:
            self._token = ""

    async def _request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        headers: dict[str, str],
        params: Mapping[str, str] | None,
    ) -> dict[str, Any]:
        status, data, reply_headers = await self.exchange(method, path, body, headers, params)
        if not isinstance(data, dict):
            raise RetryableError(f"Feishu {path}: HTTP {status} with a non-JSON body")
        code = data.get("code")
        if status == 200 and code == 0:
            # Most answers put the result in "data"; a few (bot/v3/info) beside the code.
            result = data.get("data")
            return result if isinstance(result, dict) else data
        message = str(data.get("msg", ""))
        if code in _TOKEN_CODES:
            raise _TokenRejected(f"Feishu {path}: tenant token rejected (code {code})")
        if status == 429 or code in _RATE_CODES:
            self._adopt_limit(reply_headers)
            raise RateLimited(
                f"Feishu {path}: rate limited (code {code})",
                retry_after=_reset_hint(reply_headers),
            )
        if status >= 500:
            raise RetryableError(f"Feishu {path}: HTTP {status}, code {code}")
        raise OpenApiError(path, status, int(code) if isinstance(code, int) else -1, message)

    def _adopt_limit(self, headers: Mapping[str, str]) -> None:
        """Pace the app at the limit Feishu announced (``x-ogw-ratelimit-limit``, calls a second)
        when it is below the configured rate: otherwise every pause would end in a burst that is
        refused again.  A reload of the instance restores the configured rate."""
        try:
            limit = float(headers.get("x-ogw-ratelimit-limit", ""))
        except ValueError:
            return
        if 0 < limit < self._bucket.rate:
            self._bucket.configure(limit, burst=1)
            self._log.warning(
                "Feishu limits app %s to %g calls a second: pacing at that rate",
                self._settings.app_id,
                limit,
                extra={"event": "rate_adopted"},
            )

    async def exchange(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, Any, Mapping[str, str]]:
        """One JSON request to ``base + path``: (HTTP status, parsed body or None, headers).
        Network failures and timeouts become RetryableError; the rest is the caller's to judge."""
        timeout = aiohttp.ClientTimeout(total=self._settings.request_timeout)
        try:
            async with self._session().request(
                method,
                self.base + path,
                json=body,
                params=params,
                headers={**(headers or {}), "Accept": "application/json"},
                timeout=timeout,
            ) as response:
                try:
                    data = await response.json(content_type=None)
                except ValueError:
                    data = None
                return response.status, data, response.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryableError(f"Feishu {path} unreachable: {type(exc).__name__}: {exc}") from exc


def _reset_hint(headers: Mapping[str, str]) -> float:
    """Seconds until Feishu's rate-limit window resets (``x-ogw-ratelimit-reset``), else 1 s: the
    limits are per second or per minute, and a second is the common case."""
    try:
        return max(float(headers.get("x-ogw-ratelimit-reset", "")), 0.1)
    except ValueError:
        return 1.0
