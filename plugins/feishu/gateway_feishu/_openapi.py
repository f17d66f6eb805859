"""Feishu's OpenAPI over aiohttp: the tenant token, errors mapped to the core's tree, quota, retries.

Every call is async with a timeout, takes a token from the app's shared bucket (Feishu meters calls
per app, whichever instance or reply makes them), and goes through the core's ``call_with_retry``,
which retries what is transient:

* Feishu's app-wide frequency limits (HTTP 429 from its gateway, 99991400, 11232):
  :class:`~gateway.errors.RateLimited` with the ``x-ogw-ratelimit-reset`` hint, so the whole app
  pauses.  ``x-ogw-ratelimit-limit`` is the limit *of that API*: when it is below the app's rate,
  calls to that API are paced at it from then on (the rest of the app keeps its rate);
* limits on one chat (230020: 5 messages a second) or one card (10 operations a second; its
  error is not documented, see the README): :class:`~gateway.errors.RateLimited` without a hint,
  so only that call backs off, and the rest of the app goes on;
* an expired or invalid tenant token (99991661/99991663/99991668/99991677): the token is dropped,
  so the retry fetches a new one;
* "internal error, retry later" (300120) and "the card is in an interaction" (200810), which come
  with HTTP 400; HTTP 5xx, a non-JSON body (a gateway error page) and network errors.

Anything else Feishu refuses (missing permission, bad parameter, recipient unknown, a card with too
many components) is an :class:`OpenApiError` carrying Feishu's ``code``; retrying it cannot help.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from gateway import openapi
from gateway.errors import AuthenticationError, RateLimited, RetryableError
from gateway.openapi import OpenApiClient, TokenRejected, exchange_json
from gateway.ratelimit import TokenBucket
from gateway_feishu.settings import FeishuSettings

__all__ = ["OpenApi", "OpenApiError", "api_name"]

TOKEN_PATH = "/open-apis/auth/v3/tenant_access_token/internal"
_TOKEN_CODES = frozenset({99991661, 99991663, 99991668, 99991677})
# The app's frequency limits: 99991400 (per app and API), 11232 (the app's messages).
_APP_RATE_CODES = frozenset({99991400, 11232})
# Too many messages to one chat (5 a second); only sends to that chat need to wait.
_CHAT_RATE_CODE = 230020
# "Internal error, retry later" and "the card is in an interaction": transient, despite HTTP 400.
_RETRY_CODES = frozenset({300120, 200810})
# An operation on one card (/cardkit/v1/cards/<id>...): Feishu allows 10 a second per card.
_CARD_PATH = re.compile(r"^/open-apis/cardkit/v1/cards/[^/]+")
# Path segments that are ids, for naming an API (its limit is per API, whatever the ids).
_ID_AFTER = ("messages", "cards", "elements")
# Feishu's codes for "the app id or secret is wrong" at the token endpoint.
_CREDENTIAL_CODES = frozenset({10003, 10014, 10015})


class OpenApiError(openapi.OpenApiError):
    """Feishu refused a call for a reason retrying cannot fix (bad parameter, missing permission)."""

    code: int

    def __init__(self, path: str, status: int, code: int, message: str) -> None:
        super().__init__(
            f"Feishu {path} failed: HTTP {status}, code {code}: {message}",
            path=path,
            status=status,
            code=code,
        )


class OpenApi(OpenApiClient[FeishuSettings]):
    """One app's OpenAPI client (see :class:`gateway.openapi.OpenApiClient`)."""

    @functools.cached_property
    def _api_paces(self) -> dict[str, TokenBucket]:
        """Paces for the APIs Feishu announced a limit below the app's rate for (by api_name)."""
        return {}

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

        api = api_name(method, path)

        async def attempt(token: str) -> dict[str, Any]:
            headers = {"Authorization": f"Bearer {token}"}
            return await self._request(method, path, body, headers, params, api)

        async def once() -> dict[str, Any]:
            pace = self._api_paces.get(api)
            if pace is not None:
                await pace.acquire()
            return await self._authorized(attempt)

        return await self._retried(once)

    async def _fetch_token(self) -> tuple[str, float]:
        body = {
            "app_id": self._settings.app_id,
            "app_secret": self._settings.app_secret.reveal(),
        }
        status, data, _ = await self.exchange("POST", TOKEN_PATH, body)
        code = data.get("code") if isinstance(data, dict) else None
        token = data.get("tenant_access_token") if isinstance(data, dict) else None
        if code in _CREDENTIAL_CODES or (status in (400, 401, 403) and code != 0):
            raise AuthenticationError(
                f"Feishu rejected the app id/secret of app {self._settings.app_id} (code {code})"
            )
        if code != 0 or not isinstance(token, str) or not token:
            raise RetryableError(f"Feishu {TOKEN_PATH}: HTTP {status}, code {code}")
        return token, float(data.get("expire", 7200))

    async def _request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        headers: dict[str, str],
        params: Mapping[str, str] | None,
        api: str,
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
            raise TokenRejected(f"Feishu {path}: tenant token rejected (code {code})")
        if code == _CHAT_RATE_CODE:
            # One chat's limit: this send waits (backoff), other chats and calls go on.
            raise RateLimited(f"Feishu {path}: too many messages to this chat (code {code})")
        if status == 429 or code in _APP_RATE_CODES:
            if _CARD_PATH.match(path) and "x-ogw-ratelimit-limit" not in reply_headers:
                # Not Feishu's gateway (whose answers name the API's limit): this card's own
                # 10 operations a second.  Only this card waits.
                raise RateLimited(f"Feishu {path}: too many operations on this card (code {code})")
            self._adopt_limit(api, reply_headers)
            raise RateLimited(
                f"Feishu {path}: rate limited (code {code})",
                retry_after=_reset_hint(reply_headers),
            )
        if status >= 500 or code in _RETRY_CODES:
            raise RetryableError(f"Feishu {path}: HTTP {status}, code {code}: {message}")
        raise OpenApiError(path, status, int(code) if isinstance(code, int) else -1, message)

    def _adopt_limit(self, api: str, headers: Mapping[str, str]) -> None:
        """Pace ``api`` at the limit Feishu announced for it (``x-ogw-ratelimit-limit``, calls a
        second) when that is below the app's rate: otherwise every pause would end in a burst that
        is refused again.  The limit is per API, so other APIs keep the app's rate.  A reload of the
        instance (a new driver) forgets it."""
        try:
            limit = float(headers.get("x-ogw-ratelimit-limit", ""))
        except ValueError:
            return
        if not 0 < limit < self._bucket.rate:
            return
        pace = self._api_paces.get(api)
        if pace is not None and pace.rate <= limit:
            return
        if pace is None:
            self._api_paces[api] = TokenBucket(limit, burst=1)
        else:
            pace.configure(limit, burst=1)
        self._log.warning(
            "Feishu limits app %s to %g calls a second on %s: pacing that API at it",
            self._settings.app_id,
            limit,
            api,
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
        return await exchange_json(
            self._session(),
            method,
            self.base + path,
            body,
            headers=headers,
            params=params,
            label=f"Feishu {path}",
            timeout=self._settings.request_timeout,
        )


def api_name(method: str, path: str) -> str:
    """The API a call goes to, as Feishu meters it: method and path with the ids left out
    (``PUT /open-apis/cardkit/v1/cards/:id/elements/:id/content``)."""
    parts = path.split("?", 1)[0].split("/")
    for i in range(1, len(parts)):
        if parts[i - 1] in _ID_AFTER and parts[i]:
            parts[i] = ":id"
    return f"{method.upper()} {'/'.join(parts)}"


def _reset_hint(headers: Mapping[str, str]) -> float:
    """Seconds until Feishu's rate-limit window resets (``x-ogw-ratelimit-reset``), else 1 s: the
    limits are per second or per minute, and a second is the common case."""
    try:
        return max(float(headers.get("x-ogw-ratelimit-reset", "")), 0.1)
    except ValueError:
        return 1.0
