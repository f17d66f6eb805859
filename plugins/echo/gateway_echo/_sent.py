"""Proactive messages echo "delivered": what the outbound API sent, readable at ``GET /sent``."""

from __future__ import annotations

import collections
import time
import uuid
from typing import Any

from gateway.models import Outgoing

__all__ = ["SentMessages"]


class SentMessages:
    """The last ``limit`` proactive messages, oldest first; kept across reconnections."""

    def __init__(self, limit: int = 1000) -> None:
        self._messages: collections.deque[dict[str, Any]] = collections.deque(maxlen=limit)

    def add(self, message: Outgoing) -> str:
        message_id = uuid.uuid4().hex
        self._messages.append(
            {
                "id": message_id,
                "target": message.target.value,
                "to": message.to,
                "text": message.text,
                "format": "markdown" if message.markdown else "text",
                "title": message.title,
                "at": time.time(),
            }
        )
        return message_id

    def to_json(self) -> dict[str, Any]:
        return {"messages": list(self._messages)}
