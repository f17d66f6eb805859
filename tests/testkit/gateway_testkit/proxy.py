"""A real SOCKS5 proxy (pproxy in a subprocess) for the drivers' proxy tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from pathlib import Path

__all__ = ["start_proxy", "stop_proxy", "wait_port"]


def start_proxy(port: int, log: Path) -> subprocess.Popen[bytes]:
    """pproxy as a SOCKS5 server on 127.0.0.1:``port``, logging each relayed connection to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pproxy", "-l", f"socks5://127.0.0.1:{port}", "-v"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop_proxy(proxy: subprocess.Popen[bytes]) -> None:
    if proxy.poll() is None:
        proxy.kill()
    proxy.wait(5)


async def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Until ``port`` accepts connections (the proxy is listening)."""
    async with asyncio.timeout(timeout):
        while True:
            assert process.poll() is None, "the proxy exited"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return
            await asyncio.sleep(0.05)
