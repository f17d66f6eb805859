"""The operations endpoint: health, readiness, instance status and Prometheus metrics over HTTP.

``GET /healthz``       200 while the process runs.
``GET /readyz``        200 when every running instance is connected, else 503; per-instance states.
``GET /v1/instances``  the status of every running instance (what ``gateway status`` shows).
``GET /metrics``       the gateway's metrics in the Prometheus text format.

It binds to 127.0.0.1 by default: nothing here needs to be public, and nothing secret is served.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.config.process import HttpSettings
from gateway.logs import redact
from gateway.runtime import Gateway, InstanceRuntime
from gateway.supervisor import InstanceState

__all__ = [
    "OpsServer",
    "fetch_instances",
    "format_status",
    "instance_view",
    "parse_address",
    "start_ops",
]

log = logging.getLogger("gateway")


def instance_view(runtime: InstanceRuntime) -> dict[str, Any]:
    """One instance as ``/v1/instances`` shows it (JSON-ready)."""
    status = runtime.status
    return {
        "driver": status.driver,
        "agent": runtime.config.agent_type,
        "state": status.state.value,
        "connected_since": status.connected_since,
        "last_frame": status.last_frame,
        "reconnects": status.reconnects,
        "in_flight": status.in_flight,
        "denied": status.denied,
        "last_error": redact(status.last_error),
    }


class OpsServer:
    """The HTTP server of one gateway; :meth:`start` binds it, :meth:`close` stops it."""

    def __init__(self, gateway: Gateway, host: str, port: int) -> None:
        self.gateway = gateway
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/v1/instances", self._instances)
        app.router.add_get("/metrics", self._metrics)
        self._app = app

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        runner = web.AppRunner(self._app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("http endpoint listening on %s", self.url)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _views(self) -> dict[str, dict[str, Any]]:
        return {
            name: instance_view(runtime) for name, runtime in sorted(self.gateway.instances.items())
        }

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        instances = {
            name: runtime.status.state.value
            for name, runtime in sorted(self.gateway.instances.items())
        }
        ready = all(state == InstanceState.CONNECTED for state in instances.values())
        return web.json_response(
            {"status": "ready" if ready else "not ready", "instances": instances},
            status=200 if ready else 503,
        )

    async def _instances(self, request: web.Request) -> web.Response:
        return web.json_response({"instances": self._views()})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.gateway.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start_ops(gateway: Gateway, settings: HttpSettings) -> OpsServer | None:
    """Start the endpoint if enabled.  A port in use is logged, not fatal: the instances matter more
    than their dashboard."""
    if not settings.enabled:
        return None
    server = OpsServer(gateway, settings.host, settings.port)
    try:
        await server.start()
    except OSError as exc:
        log.error(
            "http endpoint not started: cannot listen on http://%s:%d: %s",
            settings.host,
            settings.port,
            exc.strerror or exc,
        )
        return None
    return server


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``:PORT``, host 127.0.0.1) as given to ``--http``; ValueError if invalid."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def _when(epoch: object) -> str:
    if not isinstance(epoch, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def format_status(instances: dict[str, dict[str, Any]]) -> str:
    """The table ``gateway status`` prints."""
    header = ("INSTANCE", "DRIVER", "STATE", "SINCE", "RECONNECTS", "IN FLIGHT", "DENIED", "ERROR")
    rows = [header]
    for name, view in instances.items():
        rows.append(
            (
                name,
                str(view.get("driver", "")),
                str(view.get("state", "")),
                _when(view.get("connected_since")),
                str(view.get("reconnects", 0)),
                str(view.get("in_flight", 0)),
                str(view.get("denied", 0)),
                str(view.get("last_error") or "-"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in rows
    ]
    if not instances:
        lines.append("(no instance running)")
    return "\n".join(lines)


async def fetch_instances(url: str, timeout: float = 5.0) -> dict[str, dict[str, Any]]:
    """``GET URL/v1/instances``; raises aiohttp.ClientError, TimeoutError or ValueError."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.get(f"{url.rstrip('/')}/v1/instances") as response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status} from {response.url}")
            body = await response.json()
    instances = body.get("instances") if isinstance(body, dict) else None
    if not isinstance(instances, dict):
        raise ValueError("unexpected response (no 'instances' object)")
    return instances
