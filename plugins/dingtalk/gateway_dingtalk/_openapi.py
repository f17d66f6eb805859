"""DingTalk's OpenAPI over aiohttp: access tokens, errors mapped to the core's tree, quota and retries.

Every call is async with a timeout, takes a token from the app's shared bucket (all instances and
conversations of one app draw from it: DingTalk's quota is per app), and is retried by the core's
``call_with_retry`` on what is transient: 403 ``...QpsLimit...`` and 429 (the whole app pauses a
second), 5xx, network errors, and an expired token (DingTalk answers it with 400
``InvalidAuthentication``, not 401 — the official SDK misses this and keeps failing).
"""

from __future__ import annotations

import uuid
from typing import Any

from gateway import openapi
from gateway.errors import AuthenticationError, RateLimited, RetryableError
from gateway.openapi import OpenApiClient, TokenRejected, exchange_json
from gateway_dingtalk.settings import DingTalkSettings

__all__ = ["OpenApi", "OpenApiError"]


class OpenApiError(openapi.OpenApiError):
    """DingTalk refused a call for a reason retrying cannot fix (bad parameter, missing permission)."""

    code: str

    def __init__(self, path: str, status: int, code: str, message: str) -> None:
        super().__init__(
            f"DingTalk {path} failed: HTTP {status} {code}: {message}",
            path=path,
            status=status,
            code=code,
        )


class OpenApi(OpenApiClient[DingTalkSettings]):
    """One app's OpenAPI client (see :class:`gateway.openapi.OpenApiClient`)."""

    @property
    def base(self) -> str:
        return self._settings.endpoint.rstrip("/")

    async def call(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """An authenticated OpenAPI call, retried when transient; returns the JSON body."""

        async def attempt(token: str) -> dict[str, Any]:
            headers = {"x-acs-dingtalk-access-token": token}
            return await self._request(method, self.base + path, body, headers, authorized=True)

        async def once() -> dict[str, Any]:
            return await self._authorized(attempt)

        return await self._retried(once)

    async def post_webhook(self, url: str, body: dict[str, Any]) -> None:
        """A message through a session webhook (no token; errors come as ``errcode`` with HTTP 200)."""

        async def once() -> dict[str, Any]:
            data = await self._request("POST", url, body, {})
            errcode = data.get("errcode", 0)
            if errcode in (410100, 660026):  # "sent too fast", "too many per minute"
                raise RateLimited(
                    f"session webhook throttled: {data.get('errmsg')}", retry_after=3.0
                )
            if errcode:
                raise OpenApiError("sessionWebhook", 200, str(errcode), str(data.get("errmsg", "")))
            return data

        await self._retried(once)

    async def _fetch_token(self) -> tuple[str, float]:
        body = {
            "appKey": self._settings.client_id,
            "appSecret": self._settings.client_secret.reveal(),
        }
        try:
            data = await self._request("POST", self.base + "/v1.0/oauth2/accessToken", body, {})
        except OpenApiError as exc:
            if exc.status in (400, 401, 403):
                raise AuthenticationError(
                    f"DingTalk rejected the client id/secret of app {self._settings.client_id} "
                    f"({exc.code})"
                ) from None
            raise
        return str(data["accessToken"]), float(data.get("expireIn", 7200))

    async def _request(
        self,
        method: str,
        url: str,
        body: dict[str, Any],
        headers: dict[str, str],
        *,
        authorized: bool = False,
    ) -> dict[str, Any]:
        """One exchange judged by DingTalk's answer.  With ``authorized`` (the headers carry the
        access token), a refused token raises :class:`TokenRejected`."""
        path = url.split("?", 1)[0].removeprefix(self.base)
        status, data = await self.exchange(method, url, body, headers)
        if not isinstance(data, dict):
            # The per-IP ban answers with an HTML page; anything else that is not JSON is transient.
            raise RetryableError(f"DingTalk {path}: HTTP {status} with a non-JSON body")
        if status == 200:
            return data
        code = str(data.get("code", ""))
        message = str(data.get("message", ""))
        if (status == 400 and code == "InvalidAuthentication") or status == 401:
            if authorized:
                raise TokenRejected(f"DingTalk {path}: token rejected ({code or status})")
        if (status == 403 and "Limit" in code) or status == 429:
            raise RateLimited(f"DingTalk {path}: {code or status}", retry_after=1.0)
        if status >= 500:
            raise RetryableError(f"DingTalk {path}: HTTP {status} {code}")
        raise OpenApiError(path, status, code, message)

    async def exchange(
        self, method: str, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """One JSON request: (HTTP status, parsed body or None).  Network failures and timeouts
        become RetryableError; everything else is the caller's to judge."""
        path = url.split("?", 1)[0].removeprefix(self.base)
        status, data, _ = await exchange_json(
            self._session(),
            method,
            url,
            body,
            headers=headers,
            label=f"DingTalk {path}",
            timeout=self._settings.request_timeout,
        )
        return status, data


def new_guid() -> str:
    """An idempotency key for one logical call (kept across its retries)."""
    return uuid.uuid4().hex
