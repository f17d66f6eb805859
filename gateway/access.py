"""The access-control hook: runs before the agent for every message.

The core allows everything; per-instance policies (allow-lists, group rules) plug in here.
"""

from __future__ import annotations

from typing import Protocol

from gateway.models import Incoming

__all__ = ["AccessPolicy", "AllowAll"]


class AccessPolicy(Protocol):
    async def check(self, message: Incoming) -> None:
        """Return to allow; raise :class:`~gateway.errors.AccessDenied` (readable text) to refuse."""


class AllowAll:
    async def check(self, message: Incoming) -> None:
        return None
