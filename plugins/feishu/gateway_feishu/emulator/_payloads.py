"""Feishu-shaped ids and event payloads (schema 2.0), built the way Feishu builds them.

Id formats follow the docs' examples: ``ou_``/``on_``/``oc_``/``om_`` + 32 hex, ``cli_`` app ids,
19-digit CardKit card ids, 32-hex event ids.  Ids of users and chats are derived from the app and a
name, so a test can say ``sender="bob"`` and get the same ``open_id`` every time (open ids are
per-app on Feishu, as here).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Any

import attrs

__all__ = [
    "User",
    "card_action_event",
    "chat_id_for",
    "dumps",
    "message_event",
    "new_card_id",
    "new_event_id",
    "new_message_id",
    "now_ms",
]


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def now_ms() -> int:
    return int(time.time() * 1000)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def new_event_id() -> str:
    return secrets.token_hex(16)


def new_message_id() -> str:
    return "om_" + secrets.token_hex(16)


def new_card_id() -> str:
    return str(7_000_000_000_000_000_000 + secrets.randbelow(10**18))


def chat_id_for(app: str, kind: str, name: str) -> str:
    """The ``oc_`` id of chat ``name`` (``kind`` "p2p" or "group") of ``app``."""
    return "oc_" + _digest(app, kind, name)[:32]


@attrs.frozen
class User:
    """A Feishu user as one app sees them."""

    open_id: str
    union_id: str
    user_id: str
    name: str

    @classmethod
    def named(cls, app: str, name: str) -> User:
        """The user called ``name``; a name starting with ``ou_`` is taken as the open_id."""
        if name.startswith("ou_"):
            open_id = name
        else:
            open_id = "ou_" + _digest(app, "user", name)[:32]
        seed = _digest(open_id)
        return cls(open_id, "on_" + seed[:32], seed[32:40], name)

    def ids(self) -> dict[str, str]:
        return {"union_id": self.union_id, "user_id": self.user_id, "open_id": self.open_id}


def _header(
    event_type: str, event_id: str, app: str, tenant_key: str, token: str
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "event_type": event_type,
        "create_time": str(now_ms()),
        "token": token,
        "app_id": app,
        "tenant_key": tenant_key,
    }


def message_event(
    *,
    app: str,
    tenant_key: str,
    token: str,
    event_id: str,
    message_id: str,
    chat_id: str,
    chat_type: str,
    sender: User,
    message_type: str,
    content: str,
    mentions: list[dict[str, Any]],
    parent_id: str = "",
    root_id: str = "",
) -> dict[str, Any]:
    """An ``im.message.receive_v1`` event (schema 2.0) as the long connection delivers it."""
    created = str(now_ms())
    message: dict[str, Any] = {
        "message_id": message_id,
        "root_id": root_id,
        "parent_id": parent_id,
        "create_time": created,
        "update_time": created,
        "chat_id": chat_id,
        "chat_type": chat_type,
        "message_type": message_type,
        "content": content,
        "user_agent": "Mozilla/5.0 (emulator) Feishu/7.30.0",
    }
    if mentions:
        message["mentions"] = mentions
    return {
        "schema": "2.0",
        "header": _header("im.message.receive_v1", event_id, app, tenant_key, token),
        "event": {
            "sender": {
                "sender_id": sender.ids(),
                "sender_type": "user",
                "tenant_key": tenant_key,
            },
            "message": message,
        },
    }


def card_action_event(
    *,
    app: str,
    tenant_key: str,
    token: str,
    event_id: str,
    operator: User,
    value: Any,
    tag: str,
    message_id: str | None,
    chat_id: str | None,
) -> dict[str, Any]:
    """A ``card.action.trigger`` callback (schema 2.0); ``create_time`` is in microseconds, as
    the docs say for callbacks."""
    header = _header("card.action.trigger", event_id, app, tenant_key, token)
    header["create_time"] = str(int(time.time() * 1_000_000))
    context: dict[str, Any] = {}
    if message_id is not None:
        context["open_message_id"] = message_id
    if chat_id is not None:
        context["open_chat_id"] = chat_id
    return {
        "schema": "2.0",
        "header": header,
        "event": {
            "operator": {"tenant_key": tenant_key, **operator.ids()},
            "token": "c-" + secrets.token_hex(20),
            "action": {"value": value, "tag": tag},
            "host": "im_message",
            "context": context,
        },
    }
