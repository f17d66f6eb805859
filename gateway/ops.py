"""The operations endpoint: health, readiness, instance status and Prometheus metrics over HTTP.

``GET /healthz``       200 while the process runs.
``GET /readyz``        200 when every instance is connected, else 503; per-instance states.
``GET /v1/instances``  the status of every instance (what ``gateway status`` shows): the running
                       ones, and those stopping or failed to start during a reload.
``GET /v1/instances/{name}``  the status of one instance.
``GET /metrics``       the gateway's metrics in the Prometheus text format.
``POST /v1/instances/{name}/messages``
                       send a proactive message through an instance (bearer token required; off
                       without a configured token).  Body: ``{"to": ID, "text": TEXT, "target":
                       "conversation"|"user", "format": "text"|"markdown", "title": TEXT}``; an
                       ``Idempotency-Key`` header (or ``"idempotency_key"``) makes retries safe.

Every answer is JSON, errors too (``{"error": ...}``): unknown paths, wrong methods, bodies too large
and unexpected failures (a 500 that says nothing of the cause, which is logged).  It binds to
127.0.0.1 by default: nothing here needs to be public, and nothing secret is served.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.config.process import TOKEN_VARIABLE, HttpSettings
from gateway.errors import DriverError, RequestConflict, SendRejected
from gateway.logs import redact
from gateway.models import Outgoing, TargetKind
from gateway.runtime import FailedStart, Gateway, InstanceRuntime
from gateway.secrets import Secret
from gateway.supervisor import InstanceState

__all__ = [
    "OpsServer",
    "check_url",
    "fetch_instances",
    "format_status",
    "instance_view",
    "local_url",
    "parse_address",
    "post_message",
    "start_ops",
]

log = logging.getLogger("gateway")


def instance_view(runtime: InstanceRuntime | FailedStart) -> dict[str, Any]:
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

    def __init__(self, gateway: Gateway, settings: HttpSettings) -> None:
        self.gateway = gateway
        self.host = settings.host
        self.port = settings.port
        self._token = settings.token
        self._max_chars = settings.max_message_chars
        self._runner: web.AppRunner | None = None
        # Room for the longest text allowed with every character escaped as a JSON surrogate pair
        # (12 bytes), plus the other fields; a larger body is refused before it is read.
        self._max_body = _BODY_OVERHEAD + 12 * self._max_chars
        app = web.Application(client_max_size=self._max_body, middlewares=[self._json_errors])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/v1/instances", self._instances)
        app.router.add_get("/v1/instances/{name}", self._instance)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/instances/{name}/messages", self._send)
        self._app = app

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"

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

    @web.middleware
    async def _json_errors(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """Turn what aiohttp raises (404, 405, 413) and unexpected exceptions into JSON errors."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            # 405 names the methods that would work.
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return _error(exc.status, self._explain(exc, request), headers=headers)
        except Exception:
            # The cause may name internals (or, from a library, worse): logged (redacted), not sent.
            log.exception("%s %s failed", request.method, request.path)
            return _error(500, "internal error; the gateway logged the details")

    def _explain(self, exc: web.HTTPException, request: web.Request) -> str:
        match exc.status:
            case 404:
                return f"no such endpoint: {request.path}"
            case 405:
                allowed = exc.headers.get("Allow", "")
                return f"{request.method} is not allowed on {request.path} (allowed: {allowed})"
            case 413:
                return f"the body is larger than {self._max_body} bytes"
            case _:
                return exc.reason

    def _views(self) -> dict[str, dict[str, Any]]:
        return {name: instance_view(entry) for name, entry in sorted(self.gateway.listed.items())}

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        instances = {
            name: entry.status.state.value for name, entry in sorted(self.gateway.listed.items())
        }
        ready = all(state == InstanceState.CONNECTED for state in instances.values())
        return web.json_response(
            {"status": "ready" if ready else "not ready", "instances": instances},
            status=200 if ready else 503,
        )

    async def _instances(self, request: web.Request) -> web.Response:
        return web.json_response({"instances": self._views()})

    async def _instance(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        entry = self.gateway.listed.get(name)
        if entry is None:
            return _error(404, f"no instance named {name!r}")
        return web.json_response(instance_view(entry))

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.gateway.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _send(self, request: web.Request) -> web.Response:
        if not self._token:
            return _error(404, f"sending is off: no API token is configured (set {TOKEN_VARIABLE})")
        if not _authorised(request, self._token):
            return _error(
                401,
                "a valid bearer token is required (Authorization: Bearer ...)",
                headers={"WWW-Authenticate": 'Bearer realm="gateway"'},
            )
        name = request.match_info["name"]
        if name not in self.gateway.instances:
            entry = self.gateway.listed.get(name)
            if entry is not None:
                state = entry.status.state.value
                return _error(503, f"instance {name!r} is not running (it is {state})")
            return _error(404, f"no running instance named {name!r}")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the body must be a JSON object")
        key = request.headers.get("Idempotency-Key", "")
        try:
            message = _outgoing(name, body, key)
        except ValueError as exc:
            return _error(400, str(exc))
        if len(message.text) > self._max_chars:
            return _error(
                413,
                f"'text' has {len(message.text)} characters; the limit is {self._max_chars} "
                "([http] max_message_chars in gateway.toml)",
            )
        try:
            sent = await self.gateway.send(message)
        except KeyError:  # stopped (reload) while the body was read
            return _error(404, f"no running instance named {name!r}")
        except RequestConflict as exc:
            return _error(409, str(exc))
        except SendRejected as exc:
            return _error(422, redact(str(exc)))
        except DriverError as exc:
            log.warning("instance %s: proactive message failed: %s", name, exc)
            return _error(502, f"the platform did not take the message: {redact(str(exc))}")
        return web.json_response(
            {
                "instance": name,
                "target": message.target.value,
                "to": message.to,
                "message_ids": list(sent.ids),
                "parts": len(sent.ids),
                "replayed": sent.replayed,
            },
            headers={"Idempotent-Replayed": "true"} if sent.replayed else None,
        )


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: What a body may hold besides the text (the other fields, JSON syntax).
_BODY_OVERHEAD = 16 * 1024
_FIELDS = {"to", "text", "target", "format", "title", "idempotency_key"}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _authorised(request: web.Request, token: Secret) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Constant-time comparison: the endpoint may be reachable by others than the operator.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.reveal().encode()
    )


def _outgoing(instance: str, body: Any, header_key: str) -> Outgoing:
    """The message a request body describes; ValueError naming the field if it is invalid."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise ValueError(
            f"unknown field(s): {', '.join(unknown)} (allowed: {', '.join(sorted(_FIELDS))})"
        )
    for field in ("to", "text"):
        if not isinstance(body.get(field), str) or not body[field].strip():
            raise ValueError(f"{field!r} is required and must be a non-empty string")
    for field in ("target", "format", "title", "idempotency_key"):
        if field in body and not isinstance(body[field], str):
            raise ValueError(f"{field!r} must be a string")
    target = body.get("target", TargetKind.CONVERSATION.value)
    if target not in {kind.value for kind in TargetKind}:
        raise ValueError(f"'target' must be 'conversation' or 'user', not {target!r}")
    form = body.get("format", "text")
    if form not in ("text", "markdown"):
        raise ValueError(f"'format' must be 'text' or 'markdown', not {form!r}")
    key = header_key or body.get("idempotency_key", "")
    if header_key and body.get("idempotency_key", header_key) != header_key:
        raise ValueError("the Idempotency-Key header and 'idempotency_key' differ")
    if len(key) > 255:
        raise ValueError("the idempotency key is longer than 255 characters")
    return Outgoing.create(
        instance=instance,
        to=body["to"].strip(),
        text=body["text"],
        target=target,
        markdown=form == "markdown",
        title=body.get("title", ""),
        idempotency_key=key,
    )


async def start_ops(gateway: Gateway, settings: HttpSettings) -> OpsServer | None:
    """Start the endpoint if enabled.  A port in use is logged, not fatal: the instances matter more
    than their dashboard."""
    if not settings.enabled:
        return None
    server = OpsServer(gateway, settings)
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


#: A wildcard bind address is reached through loopback on the same host.
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def local_url(settings: HttpSettings) -> str:
    """The URL a client on this host reaches the endpoint ``settings`` describe by (what ``gateway
    status`` and ``gateway send`` use by default); ValueError if the port is not fixed."""
    if not settings.port:
        raise ValueError(
            "the [http] port is 0 (any free port): give the URL the gateway logged at start"
        )
    host = _LOOPBACK.get(settings.host, settings.host)
    return f"http://{_url_host(host)}:{settings.port}"


def check_url(text: str) -> str:
    """``text`` if it is an http(s) URL with a host; ValueError saying what is expected if not."""
    try:
        parts = urlsplit(text)
        # .port raises ValueError for a port that is not a number from 0 to 65535.
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(f"invalid URL {text!r}: expected http://HOST:PORT")
    return text


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


async def post_message(
    url: str, token: str, instance: str, body: dict[str, Any], timeout: float = 30.0
) -> tuple[int, dict[str, Any]]:
    """``POST URL/v1/instances/INSTANCE/messages`` (what ``gateway send`` does): the status and the
    JSON answer.  Raises aiohttp.ClientError or TimeoutError when the gateway cannot be reached."""
    headers = {"Authorization": f"Bearer {token}"}
    key = body.get("idempotency_key")
    if key:
        headers["Idempotency-Key"] = key
    endpoint = f"{url.rstrip('/')}/v1/instances/{quote(instance, safe='')}/messages"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.post(endpoint, json=body, headers=headers) as response:
            text = await response.text()
    try:
        answer = json.loads(text)
    except ValueError:
        answer = {"error": text.strip()[:200] or f"HTTP {response.status}"}
    return response.status, answer if isinstance(answer, dict) else {"error": str(answer)}
