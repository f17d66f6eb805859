"""Live reload (SIGHUP, ``gateway reload``) and the pidfile that names the running gateway.

A reload re-reads the plugin registry and the instances folder, validates everything, and only then
applies it (:meth:`~gateway.runtime.Gateway.apply`); an invalid folder is rejected as a whole, every
problem logged, and the running instances stay as they were.  Reloads run one at a time: signals
arriving during a reload are coalesced into one more reload after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

from gateway.config.instance import InstanceConfig, load_instances
from gateway.errors import ConfigError, GatewayError
from gateway.plugins import PluginRegistry
from gateway.runtime import Gateway, ReloadResult

__all__ = ["AlreadyRunning", "PidFile", "Reloader", "running_pid"]

log = logging.getLogger("gateway")

PIDFILE = "gateway.pid"


class AlreadyRunning(GatewayError):
    """Another live gateway uses the same state directory."""

    def __init__(self, path: Path, pid: int) -> None:
        self.path = path
        self.pid = pid
        super().__init__(
            f"another gateway (pid {pid}) is running on the state directory {path.parent} "
            f"(its pidfile is {path}); two gateways on one inbox would answer every message "
            "twice. Stop it first, or use `gateway reload` to make it re-read its instances"
        )


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, run by someone else
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def running_pid(state_path: Path) -> int | None:
    """The pid of the live gateway on ``state_path``, or None (no pidfile, or a stale one)."""
    pid = _read_pid(state_path / PIDFILE)
    return pid if pid is not None and _alive(pid) else None


class PidFile:
    """``<state_dir>/gateway.pid``: created at start (refused if it names a live process; a stale
    one is replaced) and removed at a clean exit."""

    def __init__(self, state_path: Path) -> None:
        self.path = state_path / PIDFILE
        self._owned = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        own = os.getpid()
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid = _read_pid(self.path)
                if pid is None:
                    # Maybe being written by a gateway starting right now: look again shortly.
                    time.sleep(0.2)
                    pid = _read_pid(self.path)
                if pid is not None and pid != own and _alive(pid):
                    raise AlreadyRunning(self.path, pid) from None
                log.warning("replacing the stale pidfile %s (pid %s)", self.path, pid)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as file:
                file.write(f"{own}\n")
            self._owned = True
            return
        raise GatewayError(f"cannot create the pidfile {self.path}")

    def release(self) -> None:
        if self._owned and _read_pid(self.path) == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._owned = False


def _read_configs(instances: Path) -> list[InstanceConfig]:
    return load_instances(instances, PluginRegistry.discover())


class Reloader:
    """Runs reloads of one gateway, one at a time, when :meth:`request` is called (SIGHUP)."""

    def __init__(self, gateway: Gateway, instances: Path) -> None:
        self.gateway = gateway
        self.instances = instances
        self._wanted = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="reloader")

    def request(self) -> None:
        """Ask for a reload; requests made while one runs make one more reload after it."""
        if self._lock.locked():
            log.info("reload requested during a reload: it will follow")
        self._wanted.set()

    async def _run(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            async with self._lock:
                try:
                    await self.reload()
                except Exception:
                    log.exception("reload failed")

    async def reload(self) -> ReloadResult | None:
        """Re-read and apply the instances folder; None if it was rejected."""
        log.info("reloading %s", self.instances)
        try:
            configs = await asyncio.to_thread(_read_configs, self.instances)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload rejected: %s", problem)
            log.error(
                "reload rejected: %d problem(s) in %s; the running instances are unchanged",
                len(exc.problems),
                self.instances,
            )
            return None
        result = await self.gateway.apply(configs)
        log.info("%s", result.summary())
        return result

    async def close(self) -> None:
        """Let a reload in progress finish, then stop taking requests."""
        if self._task is None:
            return
        async with self._lock:
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
