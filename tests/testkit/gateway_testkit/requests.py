"""Agent requests and agent settings for agent tests."""

from __future__ import annotations

from typing import Any

from gateway.agent import AgentRequest, HistoryTurn
from gateway.config.schema import Problems, structure
from gateway.models import ConversationKind

__all__ = ["agent_request", "agent_settings"]


def agent_request(text: str = "hello world", **changes: Any) -> AgentRequest:
    """A group-chat request with two turns of history (non-ASCII on purpose)."""
    fields: dict[str, Any] = {
        "instance": "inst-1",
        "session_key": "session-1",
        "text": text,
        "sender_id": "u-1",
        "sender_name": "Ann Ö",
        "conversation_id": "conv-1",
        "conversation_kind": ConversationKind.GROUP,
        "message_id": "msg-1",
        "history": (HistoryTurn("q1", "a1"), HistoryTurn("q2 é", "a2")),
    }
    fields.update(changes)
    return AgentRequest(**fields)


def agent_settings(cls: type[Any], data: dict[str, Any]) -> Any:
    """``cls`` built from an ``[agent]`` table through the config schema, as the loader does."""
    problems: Problems = []
    settings = structure(cls, data, "agent", problems)
    assert not problems, problems
    return settings
