"""OpenAPI: the tenant access token and IM messages (create, reply, PATCH).

From the docs (open.feishu.cn ``auth-v3/auth/tenant_access_token_internal``,
``im-v1/message/create``, ``reply``, ``patch``): the token answer is flat
``{code, msg, tenant_access_token, expire}`` and the same token is handed out until less than
30 minutes remain; ``uuid`` de-duplicates sends for an hour; 5 QPS per user or group (230020);
text up to 150 KB, cards and posts up to 30 KB (230025).  A card entity can be sent only once
(``cardkit-v1/card/create``, 使用限制: "一个卡片实体，仅支持发送一次"); the error of a second send is
not documented: here 230099, Feishu's generic "failed to create card content" code.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import TYPE_CHECKING, Any

import attrs

from gateway_feishu.emulator._faults import ApiError
from gateway_feishu.emulator._payloads import new_message_id, now_ms
from gateway_feishu.emulator._records import SentMessage

if TYPE_CHECKING:
    from gateway_feishu.emulator._server import FeishuEmulator, _Call

__all__ = ["MessageApi", "TokenApi"]

#: a token this close to its expiry is replaced by a fresh one on the next request (docs: 30 min)
_REFRESH_MARGIN = 1800.0
_RECEIVE_ID_TYPES = ("open_id", "user_id", "union_id", "email", "chat_id")
_MSG_TYPES = (
    "text",
    "post",
    "image",
    "file",
    "audio",
    "media",
    "sticker",
    "interactive",
    "share_chat",
    "share_user",
)
_TEXT_LIMIT = 150 * 1024
_RICH_LIMIT = 30 * 1024
CHAT_RATE_LIMITED = 230020


@attrs.define(eq=False)
class _Token:
    app: str
    value: str
    expires_at: float


class TokenApi:
    def __init__(self, emu: FeishuEmulator) -> None:
        self.emu = emu
        self.tokens: dict[str, _Token] = {}
        self.issued = 0

    async def tenant_access_token(self, call: _Call) -> Any:
        emu = self.emu
        body = call.body if isinstance(call.body, dict) else {}
        app, secret = body.get("app_id"), body.get("app_secret")
        if not isinstance(app, str) or app not in emu.apps:
            raise ApiError(400, 10003, "invalid param")
        call.app = app
        if emu.apps[app] != secret:
            raise ApiError(400, 10014, "app secret invalid")
        now = time.monotonic()
        token = next(
            (
                t
                for t in self.tokens.values()
                if t.app == app and t.expires_at - now > _REFRESH_MARGIN
            ),
            None,
        )
        if token is None:
            token = _Token(app, "t-" + secrets.token_hex(20), now + emu.token_ttl)
            self.tokens[token.value] = token
            self.issued += 1
        return {
            "code": 0,
            "msg": "ok",
            "tenant_access_token": token.value,
            "expire": max(0, int(token.expires_at - now)),
        }

    def authenticate(self, authorization: str | None) -> str:
        """The app of a ``Bearer t-...`` header; 99991661 without one, 99991663 if unknown or
        expired."""
        if (
            not authorization
            or not authorization.startswith("Bearer ")
            or not authorization[7:].strip()
        ):
            raise ApiError.missing_token()
        token = self.tokens.get(authorization[7:].strip())
        if token is None or token.expires_at <= time.monotonic():
            raise ApiError.invalid_token()
        return token.app

    def expire(self) -> None:
        self.tokens.clear()


def _content_json(content: Any) -> dict[str, Any]:
    if not isinstance(content, str):
        raise ApiError(400, 230001, "invalid content: content must be a JSON string")
    try:
        parsed = json.loads(content)
    except ValueError:
        raise ApiError(400, 230001, "invalid content: content is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, 230001, "invalid content: content must be a JSON object")
    return parsed


class MessageApi:
    def __init__(self, emu: FeishuEmulator) -> None:
        self.emu = emu
        #: (app, uuid) -> (message id, monotonic time of the first send)
        self._uuids: dict[tuple[str, str], tuple[str, float]] = {}

    # -- helpers ------------------------------------------------------------------------------------

    def _target_chat(self, app: str, receive_id: Any, id_type: str) -> str:
        emu = self.emu
        if not isinstance(receive_id, str) or not receive_id:
            raise ApiError.invalid_param("receive_id is required", 230001)
        if id_type == "chat_id":
            chat = emu.chats.get(receive_id)
            if chat is None or chat.app != app:
                raise ApiError(400, 230002, "The bot can not be outside the group.")
            return receive_id
        for user in emu.users.get(app, {}).values():
            if receive_id in (user.open_id, user.user_id, user.union_id) or (
                id_type == "email" and receive_id == f"{user.name}@example.com"
            ):
                return emu.p2p_chat(app, user).id
        raise ApiError(400, 230013, "Bot has NO availability to this user.")

    def _check_content(self, app: str, msg_type: Any, content: Any) -> str | None:
        """Validate ``content`` for ``msg_type``; the card id of an interactive card by reference."""
        if msg_type not in _MSG_TYPES:
            raise ApiError(400, 230001, f"invalid msg_type: {msg_type!r}")
        parsed = _content_json(content)
        size = len(content.encode())
        if size > (_TEXT_LIMIT if msg_type == "text" else _RICH_LIMIT):
            raise ApiError(400, 230025, "The length of the message content reaches its limit.")
        if msg_type == "text" and not isinstance(parsed.get("text"), str):
            raise ApiError(400, 230001, "invalid content: text is required")
        if msg_type != "interactive" or parsed.get("type") != "card":
            return None
        data = parsed.get("data")
        card_id = data.get("card_id") if isinstance(data, dict) else None
        card = self.emu.cards.get(card_id) if isinstance(card_id, str) else None
        if card is None:
            raise ApiError(400, 230099, "Failed to create card content, ext=card entity not found")
        if card.app != app:
            raise ApiError(
                400, 300311, "The current application does not have permission to use this card"
            )
        if card.message_ids:
            raise ApiError(
                400, 230099, "Failed to create card content, ext=the card entity was sent already"
            )
        assert isinstance(card_id, str)
        return card_id

    def _admit(self, call: _Call, api: str, chat_id: str) -> None:
        """Feishu's send limits: per app and API (50/s, 1000/min), then 5/s per chat."""
        emu = self.emu
        emu.check_app_limits(call, api)
        limit = emu.chat_rate_limit
        if limit is not None and not emu._admit("chat", call.path, chat_id, limit):
            raise ApiError(400, CHAT_RATE_LIMITED, "This operation triggers the frequency limit.")

    def _idempotent(self, app: str, uuid: Any) -> SentMessage | None:
        if not isinstance(uuid, str) or not uuid:
            return None
        seen = self._uuids.get((app, uuid))
        if seen is None or time.monotonic() - seen[1] > self.emu.uuid_window:
            return None
        return self.emu.sent_by_id.get(seen[0])

    def _store(self, message: SentMessage) -> SentMessage:
        emu = self.emu
        emu.messages.append(message)
        emu.sent_by_id[message.message_id] = message
        if message.uuid:
            self._uuids[(message.app, message.uuid)] = (message.message_id, message.time)
        if message.card_id is not None:
            emu.cards[message.card_id].message_ids.append(message.message_id)
        return message

    def _answer(self, message: SentMessage) -> dict[str, Any]:
        created = str(now_ms())
        data: dict[str, Any] = {
            "message_id": message.message_id,
            "msg_type": message.msg_type,
            "create_time": created,
            "update_time": created,
            "deleted": False,
            "updated": False,
            "chat_id": message.chat_id,
            "sender": {
                "id": message.app,
                "id_type": "app_id",
                "sender_type": "app",
                "tenant_key": self.emu.tenant_key,
            },
            "body": {"content": message.content},
        }
        if message.reply_to is not None:
            data["root_id"] = message.root_id or message.reply_to
            data["parent_id"] = message.reply_to
        return {"code": 0, "msg": "success", "data": data}

    # -- handlers -----------------------------------------------------------------------------------

    async def create(self, call: _Call) -> Any:
        assert call.app is not None
        id_type = call.request.query.get("receive_id_type", "")
        if id_type not in _RECEIVE_ID_TYPES:
            raise ApiError(400, 99992402, "field validation failed: receive_id_type")
        body = call.body if isinstance(call.body, dict) else {}
        again = self._idempotent(call.app, body.get("uuid"))
        if again is not None:
            return self._answer(again)
        chat_id = self._target_chat(call.app, body.get("receive_id"), id_type)
        card_id = self._check_content(call.app, body.get("msg_type"), body.get("content"))
        self._admit(call, "create", chat_id)
        message = SentMessage(
            message_id=new_message_id(),
            app=call.app,
            chat_id=chat_id,
            msg_type=body["msg_type"],
            content=body["content"],
            time=time.monotonic(),
            receive_id=body["receive_id"],
            receive_id_type=id_type,
            uuid=body.get("uuid") or None,
            card_id=card_id,
        )
        return self._answer(self._store(message))

    async def reply(self, call: _Call) -> Any:
        assert call.app is not None
        parent_id = call.request.match_info["message_id"]
        body = call.body if isinstance(call.body, dict) else {}
        again = self._idempotent(call.app, body.get("uuid"))
        if again is not None:
            return self._answer(again)
        parent = self.emu.received.get(parent_id)
        sent_parent = self.emu.sent_by_id.get(parent_id)
        if parent is not None and parent.app == call.app and parent.chat_id is not None:
            chat_id, root_id = parent.chat_id, parent.root_id or parent_id
        elif sent_parent is not None and sent_parent.app == call.app:
            chat_id, root_id = sent_parent.chat_id, sent_parent.root_id or parent_id
        else:
            raise ApiError(400, 230011, "The message is not found or has been recalled.")
        card_id = self._check_content(call.app, body.get("msg_type"), body.get("content"))
        self._admit(call, "reply", chat_id)
        message = SentMessage(
            message_id=new_message_id(),
            app=call.app,
            chat_id=chat_id,
            msg_type=body["msg_type"],
            content=body["content"],
            time=time.monotonic(),
            reply_to=parent_id,
            root_id=root_id,
            uuid=body.get("uuid") or None,
            reply_in_thread=bool(body.get("reply_in_thread")),
            card_id=card_id,
        )
        return self._answer(self._store(message))

    async def patch(self, call: _Call) -> Any:
        """Update a card message sent by this app (the only kind that can be PATCHed)."""
        assert call.app is not None
        message_id = call.request.match_info["message_id"]
        message = self.emu.sent_by_id.get(message_id)
        if message is None or message.app != call.app:
            raise ApiError(400, 230011, "The message is not found or has been recalled.")
        if message.msg_type != "interactive":
            raise ApiError(400, 230001, "invalid message type: only cards can be updated")
        body = call.body if isinstance(call.body, dict) else {}
        content = body.get("content")
        _content_json(content)
        assert isinstance(content, str)  # _content_json refused anything else
        if len(content.encode()) > _RICH_LIMIT:
            raise ApiError(400, 230025, "The length of the message content reaches its limit.")
        limit = self.emu.message_patch_limit
        if limit is not None and not self.emu._admit("message", call.path, message_id, limit):
            raise ApiError(400, CHAT_RATE_LIMITED, "This operation triggers the frequency limit.")
        updated = attrs.evolve(message, content=content)
        self.emu.sent_by_id[message_id] = updated
        self.emu.messages[self.emu.messages.index(message)] = updated
        return {"code": 0, "msg": "success", "data": {}}
