"""Feishu event payloads as core objects: ``im.message.receive_v1`` messages and
``card.action.trigger`` feedback clicks (schema 2.0 envelopes: ``{"schema", "header", "event"}``)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from gateway.models import Attachment, ConversationKind, FeedbackEvent, Incoming, Mention

__all__ = [
    "EVENT_CARD_ACTION",
    "EVENT_MESSAGE",
    "addressed_to_bot",
    "event_type",
    "feedback_from_feishu",
    "incoming_from_feishu",
]

EVENT_MESSAGE = "im.message.receive_v1"
EVENT_CARD_ACTION = "card.action.trigger"

# Message types whose content names one file by key; the agent gets them as attachments.
_FILE_TYPES = {"image": "image_key", "file": "file_key", "audio": "file_key", "media": "file_key"}


def event_type(envelope: Mapping[str, Any]) -> str:
    """The ``event_type`` of a schema 2.0 envelope (``""`` for anything else)."""
    header = envelope.get("header")
    return str(header.get("event_type", "")) if isinstance(header, Mapping) else ""


def _event(envelope: Mapping[str, Any]) -> Mapping[str, Any]:
    event = envelope["event"]
    if not isinstance(event, Mapping):
        raise TypeError("the event is not an object")
    return event


def addressed_to_bot(envelope: Mapping[str, Any], bot_open_id: str) -> bool:
    """Whether the bot should answer: always in a one-to-one chat, in a group only when the bot is
    @-mentioned (apps with the "all group messages" permission get every group message)."""
    message = _event(envelope)["message"]
    if message.get("chat_type") == "p2p":
        return True
    return any(_open_id(m) == bot_open_id for m in message.get("mentions") or ())


def incoming_from_feishu(instance: str, envelope: Mapping[str, Any], bot_open_id: str) -> Incoming:
    """Build the core's message from an ``im.message.receive_v1`` envelope.

    Raises KeyError/ValueError/TypeError on a payload that lacks what a reply needs; the caller logs
    and acknowledges it (a re-push of a malformed payload would not make it better).
    """
    event = _event(envelope)
    message, sender = event["message"], event["sender"]
    message_id, chat_id = str(message["message_id"]), str(message["chat_id"])
    if not message_id.strip() or not chat_id.strip():
        raise ValueError("message_id and chat_id must not be empty")
    mentions = message.get("mentions") or []
    content = json.loads(message.get("content") or "{}")
    if not isinstance(content, dict):
        raise TypeError("the message content is not an object")
    msgtype = str(message.get("message_type", "text"))
    text, attachments = "", list[Attachment]()
    if msgtype == "text":
        text = str(content.get("text", ""))
    elif msgtype == "post":
        text, attachments = _post(content)
    elif msgtype in _FILE_TYPES:
        key = content.get(_FILE_TYPES[msgtype])
        if key:
            name = str(content.get("file_name", ""))
            attachments.append(Attachment(kind=msgtype, name=name, url=str(key)))
    # Anything else (stickers, shared chats, merged forwards, cards) arrives empty: the core answers
    # an empty message with a prompt instead of calling the agent.
    created = message.get("create_time")
    return Incoming.create(
        instance=instance,
        # The message id, not the event id: a re-push carries both unchanged, and the message id is
        # what a reply refers to.
        message_id=message_id,
        conversation_id=chat_id,
        conversation_kind=(
            ConversationKind.SINGLE if message.get("chat_type") == "p2p" else ConversationKind.GROUP
        ),
        sender_id=str((sender.get("sender_id") or {}).get("open_id", "")),
        text=_resolve_mentions(text, mentions, bot_open_id).strip(),
        # The people mentioned besides the bot: the bot's own mention only addressed the message.
        mentions=[
            Mention(user_id=_open_id(m), name=str(m.get("name", "")))
            for m in mentions
            if _open_id(m) and _open_id(m) != bot_open_id
        ],
        attachments=attachments,
        raw=envelope,
        received_at=int(created) / 1000 if str(created or "").isdigit() else None,
    )


def _open_id(mention: Any) -> str:
    ids = mention.get("id") if isinstance(mention, Mapping) else None
    return str(ids.get("open_id", "")) if isinstance(ids, Mapping) else ""


def _resolve_mentions(text: str, mentions: list[Any], bot_open_id: str) -> str:
    """Feishu writes mentions as keys (``@_user_1``): the bot's own is dropped with the space after
    it, others become ``@Name`` so the agent reads who was meant.  Longer keys first: ``@_user_1``
    is a prefix of ``@_user_10``."""
    keyed = [m for m in mentions if isinstance(m, Mapping) and m.get("key")]
    for mention in sorted(keyed, key=lambda m: len(str(m["key"])), reverse=True):
        key = str(mention["key"])
        if _open_id(mention) == bot_open_id:
            text = re.sub(re.escape(key) + " ?", "", text)
        else:
            text = text.replace(key, f"@{mention.get('name', '')}")
    return text


def _post(content: Mapping[str, Any]) -> tuple[str, list[Attachment]]:
    """Rich text as markdown: paragraphs are lines, links stay links, code blocks stay fenced, and
    images and media become attachments.  A received post is ``{title, content}``; one that went
    through the send API is wrapped in a locale (``{"zh_cn": {...}}``)."""
    if "content" not in content and len(content) == 1:
        inner = next(iter(content.values()))
        content = inner if isinstance(inner, Mapping) else {}
    lines = [f"**{content['title']}**"] if content.get("title") else []
    attachments: list[Attachment] = []
    for paragraph in content.get("content") or []:
        parts = []
        for item in paragraph if isinstance(paragraph, list) else []:
            tag = item.get("tag") if isinstance(item, Mapping) else None
            if tag in ("text", "md"):
                parts.append(str(item.get("text", "")))
            elif tag == "a":
                parts.append(f"[{item.get('text', '')}]({item.get('href', '')})")
            elif tag == "at":
                parts.append(str(item.get("user_id", "")))  # a mention key, resolved like text
            elif tag == "code_block":
                parts.append(f"\n```{item.get('language', '')}\n{item.get('text', '')}\n```\n")
            elif tag == "hr":
                parts.append("\n---\n")
            elif tag == "img" and item.get("image_key"):
                attachments.append(Attachment(kind="image", url=str(item["image_key"])))
            elif tag == "media" and item.get("file_key"):
                attachments.append(Attachment(kind="media", url=str(item["file_key"])))
        lines.append("".join(parts))
    return "\n".join(lines).strip(), attachments


def feedback_from_feishu(instance: str, envelope: Mapping[str, Any]) -> FeedbackEvent | None:
    """The feedback click in a ``card.action.trigger`` envelope, or None if the action is not one
    of our feedback buttons (their callback value is ``{"reply_id", "rating"}``)."""
    event = _event(envelope)
    value = (event.get("action") or {}).get("value")
    if isinstance(value, str):  # some clients send the value JSON-encoded
        value = json.loads(value)
    if not isinstance(value, Mapping) or not value.get("reply_id") or not value.get("rating"):
        return None
    user = str((event.get("operator") or {}).get("open_id", ""))
    if not user:
        return None
    return FeedbackEvent.create(
        instance=instance,
        reply_id=str(value["reply_id"]),
        user_id=user,
        rating=str(value["rating"]),
    )
