"""Robot message payloads (``data`` of ``/v1.0/im/bot/messages/get``) as core messages."""

from __future__ import annotations

from typing import Any

import attrs
from dingtalk_stream import ChatbotMessage

from gateway.models import Attachment, ConversationKind, Incoming, Mention
from gateway_dingtalk._openapi import OpenApi

__all__ = ["TOPIC_BOT", "incoming_from_dingtalk", "resolve_attachments"]

TOPIC_BOT = ChatbotMessage.TOPIC

# Types DingTalk delivers with a download code; the agent gets them as attachments.
_FILE_TYPES = {"picture", "file", "audio", "video"}


def incoming_from_dingtalk(instance: str, data: dict[str, Any], frame_id: str) -> Incoming:
    """Build the core's message from a robot payload.

    Raises KeyError/ValueError/TypeError on a payload that lacks what a reply needs; the caller logs
    and acknowledges it (redelivering a malformed payload would not make it better).
    """
    parsed = ChatbotMessage.from_dict(data)  # the SDK's own reading of the payload
    conversation_id = parsed.conversation_id
    if not conversation_id:
        raise KeyError("conversationId")
    msgtype = parsed.message_type or "text"
    text = ""
    attachments: list[Attachment] = []
    if msgtype == "text" and parsed.text is not None:
        text = parsed.text.content or ""
    elif msgtype == "richText" and parsed.rich_text_content is not None:
        parts = []
        for item in parsed.rich_text_content.rich_text_list or []:
            if "text" in item:
                parts.append(str(item["text"]))
            elif "downloadCode" in item:
                attachments.append(
                    Attachment(kind=str(item.get("type", "picture")), url=item["downloadCode"])
                )
        text = "".join(parts)
    elif msgtype in _FILE_TYPES:
        content = data.get("content") or {}
        code = content.get("downloadCode") or content.get("pictureDownloadCode")
        if code:
            attachments.append(
                Attachment(kind=msgtype, name=str(content.get("fileName", "")), url=str(code))
            )
        # Voice messages come with DingTalk's own transcription: that is the question.
        text = str(content.get("recognition", ""))
    # Anything else (unknownMsgType, quota-exhausted payloads without text) arrives empty: the core
    # answers an empty message with a prompt instead of calling the agent.
    kind = (
        ConversationKind.GROUP if str(parsed.conversation_type) == "2" else ConversationKind.SINGLE
    )
    mentions = [
        Mention(user_id=str(u.staff_id or u.dingtalk_id or ""))
        for u in parsed.at_users
        if (u.staff_id or u.dingtalk_id)
    ]
    created = data.get("createAt")
    return Incoming.create(
        instance=instance,
        # msgId identifies the message; a redelivery may come in a frame with a new frame id.
        message_id=str(parsed.message_id or frame_id),
        conversation_id=str(conversation_id),
        conversation_kind=kind,
        sender_id=str(parsed.sender_staff_id or parsed.sender_id or ""),
        sender_name=str(parsed.sender_nick or ""),
        text=text.strip(),
        mentions=mentions,
        attachments=attachments,
        raw=data,
        received_at=float(created) / 1000 if isinstance(created, int | float) else None,
    )


async def resolve_attachments(api: OpenApi, robot_code: str, message: Incoming) -> Incoming:
    """Replace the download codes of ``message``'s attachments with temporary download URLs
    (``/v1.0/robot/messageFiles/download``), so an agent can fetch them.  Runs after the ACK."""
    if not message.attachments:
        return message
    resolved = []
    for attachment in message.attachments:
        if attachment.url and not attachment.url.startswith(("http://", "https://")):
            data = await api.call(
                "POST",
                "/v1.0/robot/messageFiles/download",
                {"downloadCode": attachment.url, "robotCode": robot_code},
            )
            url = data.get("downloadUrl")
            if isinstance(url, str) and url:
                attachment = attrs.evolve(attachment, url=url)
        resolved.append(attachment)
    return attrs.evolve(message, attachments=tuple(resolved))
