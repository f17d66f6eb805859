"""Ids and payloads shaped like DingTalk's (research doc §1.3, §2, §3.6)."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import random
import time
import uuid
from typing import Any

__all__ = [
    "BOT_TOPIC",
    "CARD_TOPIC",
    "MSGTYPES",
    "build_frame",
    "encrypted_id",
    "frame_id",
    "message_content",
    "new_msg_id",
    "now_ms",
    "unified_app_id",
]

BOT_TOPIC = "/v1.0/im/bot/messages/get"
CARD_TOPIC = "/v1.0/card/instances/callback"
MSGTYPES = ("text", "richText", "picture", "file", "audio", "video", "unknownMsgType")

# A 1x1 transparent PNG: what a "picture" message downloads to unless the test gives bytes.
TINY_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)

_counter = itertools.count(1)


def now_ms() -> int:
    return int(time.time() * 1000)


def frame_id(rng: random.Random) -> str:
    """A frame ``messageId`` like the real ``212ca9d7_974_1898c159aa6_1783b``."""
    return f"{rng.getrandbits(32):08x}_{rng.getrandbits(12):x}_{now_ms():x}_{next(_counter):x}"


def new_msg_id() -> str:
    """An opaque ``msgId`` like the real ``msgL+Pd4JfLx9pvRbsjMSeXQA==``."""
    return "msg" + base64.b64encode(os.urandom(16)).decode()


def encrypted_id(*parts: str) -> str:
    """A stable, opaque ``$:LWCP_v1:$...`` id (senderId, chatbotUserId, dingtalkId)."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()[:24]
    return "$:LWCP_v1:$" + base64.b64encode(digest).decode()


def conversation_id(*parts: str) -> str:
    digest = hashlib.sha256("\0".join(parts).encode()).digest()[:16]
    return "cid" + base64.b64encode(digest).decode()


def unified_app_id(client_id: str) -> str:
    """``headers.appId`` is DingTalk's unified app id (a UUID), not the clientId/AppKey."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dingtalk-emulator:{client_id}"))


def download_code() -> str:
    return base64.b64encode(os.urandom(30)).decode()


def build_frame(
    frame_type: str,
    topic: str,
    data: str,
    *,
    message_id: str,
    app_id: str | None,
    connection_id: str | None,
    extra_headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    headers: dict[str, str] = {}
    if app_id is not None:
        headers["appId"] = app_id
    if connection_id is not None:
        headers["connectionId"] = connection_id
    headers["contentType"] = "application/json"
    headers["messageId"] = message_id
    headers["time"] = str(now_ms())  # a string, as on the wire
    headers["topic"] = topic
    headers.update(extra_headers or {})
    return {"specVersion": "1.0", "type": frame_type, "headers": headers, "data": data}


def message_content(
    msgtype: str, text: str, codes: list[str], file_name: str | None
) -> dict[str, Any]:
    """The ``content`` object of a non-text message; ``codes`` are download codes issued for it."""
    code = codes[0] if codes else ""
    if msgtype == "picture":
        return {"pictureDownloadCode": "p" + code, "downloadCode": code}
    if msgtype == "richText":
        items: list[dict[str, Any]] = []
        if text:
            items.append({"text": text})
        items.extend(
            {"pictureDownloadCode": "p" + c, "downloadCode": c, "type": "picture"} for c in codes
        )
        return {"richText": items}
    if msgtype == "audio":
        return {"duration": 4000, "downloadCode": code, "recognition": text}
    if msgtype == "video":
        return {"duration": 4000, "downloadCode": code, "videoType": "mp4"}
    if msgtype == "file":
        return {
            "downloadCode": code,
            "fileName": file_name or "file.pdf",
            "spaceId": str(random.randrange(10**8, 10**9)),
            "fileId": str(random.randrange(10**8, 10**9)),
        }
    return {"unknownMsgType": "用户发送了一条消息，机器人暂不支持接收。"}


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
