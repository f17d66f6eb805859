"""A driver instance's own proxy: checking the URL, and the HTTP session that goes through it."""

from __future__ import annotations

import urllib.parse

import aiohttp

from gateway.secrets import Secret

__all__ = ["PROXY_SCHEMES", "ProxiedSession", "check_proxy_url", "proxy_repr"]

PROXY_SCHEMES = ("socks5://", "socks4://", "http://")


def check_proxy_url(proxy: str) -> None:
    """``ValueError`` unless ``proxy`` is empty (no proxy) or one of :data:`PROXY_SCHEMES`.

    A password in the URL (``socks5://user:password@host:port``) becomes a known secret, so an
    error that quotes the URL (aiohttp-socks' do) is masked in the logs like the app's secret."""
    if proxy and not proxy.startswith(PROXY_SCHEMES):
        raise ValueError("proxy must start with socks5://, socks4:// or http://")
    password = urllib.parse.urlsplit(proxy).password
    if password:
        Secret(urllib.parse.unquote(password))
        Secret(password)  # as written, percent-escapes and all


def proxy_repr(proxy: str) -> str:
    """``repr(proxy)`` with the password shown as ``***``: settings print their proxy."""
    parts = urllib.parse.urlsplit(proxy)
    if parts.password is None:
        return repr(proxy)
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return repr(urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}")))


class ProxiedSession:
    """A driver's one HTTP session (its OpenAPI calls and its websocket), through its proxy:
    ``session()`` makes it on first use, and again after :meth:`close` (a driver serves again
    after being closed by a reload)."""

    def __init__(self, proxy: str, user_agent: str) -> None:
        self._proxy = proxy
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    def __call__(self) -> aiohttp.ClientSession:
        """The session; proxy environment variables are ignored on purpose: they apply to the
        whole process, and each instance may need its own proxy (or none)."""
        if self._session is None or self._session.closed:
            connector = None
            if self._proxy:
                # aiohttp-socks is a dependency of the drivers that have a proxy setting, not of
                # the core: imported only when a proxy is configured.
                from aiohttp_socks import ProxyConnector

                connector = ProxyConnector.from_url(self._proxy)
            self._session = aiohttp.ClientSession(
                connector=connector, headers={"User-Agent": self._user_agent}
            )
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
