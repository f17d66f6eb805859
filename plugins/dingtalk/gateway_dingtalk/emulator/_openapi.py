"""The non-card OpenAPI: access tokens, session webhooks, proactive sends, message files.

Research doc §3.1-§3.3, §3.7, §3.8.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import TYPE_CHECKING, Any

import attrs
from aiohttp import web

from gateway_dingtalk.emulator._faults import ApiError
from gateway_dingtalk.emulator._payloads import download_code, now_ms
from gateway_dingtalk.emulator._records import SentReply

if TYPE_CHECKING:
    from gateway_dingtalk.emulator._server import DingTalkEmulator, _Call

__all__ = ["OpenApi"]

TOKEN_HEADER = "x-acs-dingtalk-access-token"
MSG_PARAM_LIMIT = 15000
BATCH_LIMIT = 20

# msgKey -> the msgtype it renders as
_MSG_KEYS = {
    "sampleText": "text",
    "sampleMarkdown": "markdown",
    "sampleLink": "link",
    "sampleImageMsg": "image",
    "sampleActionCard": "actionCard",
    "sampleActionCard2": "actionCard",
    "sampleActionCard3": "actionCard",
    "sampleActionCard4": "actionCard",
    "sampleActionCard5": "actionCard",
    "sampleActionCard6": "actionCard",
    "sampleAudio": "audio",
    "sampleFile": "file",
    "sampleVideo": "video",
}
_WEBHOOK_TYPES = ("text", "markdown", "actionCard", "link", "feedCard", "empty")


@attrs.define(eq=False)
class _Token:
    app: str
    value: str
    expires_at: float


@attrs.define(eq=False)
class Session:
    """A ``sessionWebhook`` issued with a message."""

    token: str
    app: str
    conversation_id: str
    conversation_type: str
    user_id: str
    msg_id: str
    expires_ms: int


@attrs.define(eq=False)
class StoredFile:
    app: str
    code: str
    content: bytes
    file_name: str
    content_type: str
    url_token: str = attrs.field(factory=lambda: uuid.uuid4().hex)


def _robot_error(errcode: int, errmsg: str) -> dict[str, Any]:
    return {"errcode": errcode, "errmsg": errmsg}


class OpenApi:
    def __init__(self, emu: DingTalkEmulator) -> None:
        self.emu = emu
        self.tokens: dict[str, _Token] = {}
        self.sessions: dict[str, Session] = {}
        self.files: dict[str, StoredFile] = {}
        self.files_by_url: dict[str, StoredFile] = {}

    # -- tokens --------------------------------------------------------------------------------------

    def authenticate(self, request: web.Request) -> str:
        value = request.headers.get(TOKEN_HEADER)
        if not value:
            raise ApiError(
                400, "AuthenticationFailed.MissingParameter", f"缺少参数：{TOKEN_HEADER}"
            )
        token = self.tokens.get(value)
        if token is None or token.expires_at <= time.monotonic():
            raise ApiError(
                self.emu.expired_token_status, "InvalidAuthentication", "不合法的access_token"
            )
        return token.app

    async def access_token(self, call: _Call) -> Any:
        emu = self.emu
        body = call.body if isinstance(call.body, dict) else {}
        key, secret = body.get("appKey"), body.get("appSecret")
        if not isinstance(key, str) or emu.apps.get(key) != secret:
            raise ApiError(400, "invalidClientIdOrSecret", "无效的clientId或者clientSecret")
        call.app = key
        now = time.monotonic()
        token = next((t for t in self.tokens.values() if t.app == key and t.expires_at > now), None)
        if token is None:
            token = _Token(key, uuid.uuid4().hex, 0.0)
            self.tokens[token.value] = token
        token.expires_at = now + emu.token_ttl  # fetching again extends the same token
        return {"accessToken": token.value, "expireIn": max(1, math.ceil(emu.token_ttl))}

    def expire_tokens(self) -> None:
        self.tokens.clear()

    # -- session webhook -------------------------------------------------------------------------------

    def issue_session(
        self,
        app: str,
        conversation_id: str,
        conversation_type: str,
        user_id: str,
        msg_id: str,
        ttl: float,
    ) -> Session:
        session = Session(
            token=uuid.uuid4().hex,
            app=app,
            conversation_id=conversation_id,
            conversation_type=conversation_type,
            user_id=user_id,
            msg_id=msg_id,
            expires_ms=now_ms() + int(ttl * 1000),
        )
        self.sessions[session.token] = session
        return session

    async def send_by_session(self, call: _Call) -> Any:
        session = self.sessions.get(call.request.query.get("session", ""))
        if session is None:
            return _robot_error(300001, "session不存在")
        call.app = session.app
        if now_ms() >= session.expires_ms:
            return _robot_error(300001, "session已过期")
        body = call.body
        if not isinstance(body, dict):
            return _robot_error(40035, "缺少参数 json")
        msgtype = body.get("msgtype")
        if msgtype not in _WEBHOOK_TYPES:
            return _robot_error(400105, "不支持的消息类型")
        section = body.get(msgtype) if msgtype != "empty" else {}
        if not isinstance(section, dict):
            return _robot_error(40035, f"缺少参数 {msgtype}")
        if msgtype == "text":
            text, title = section.get("content"), ""
        else:
            text, title = section.get("text", ""), section.get("title", "")
        if not isinstance(text, str) or (msgtype in ("text", "markdown") and not text):
            return _robot_error(40035, f"缺少参数 {msgtype}")
        if msgtype == "markdown" and not section.get("title"):
            return _robot_error(40035, "缺少参数 markdown.title")
        self.emu.sent.append(
            SentReply(
                via="session",
                app=session.app,
                conversation_id=session.conversation_id,
                conversation_type=session.conversation_type,
                user_id=session.user_id,
                msgtype=msgtype,
                text=text,
                title=str(title or ""),
                at=body.get("at"),
                body=body,
                time=time.monotonic(),
                in_reply_to=session.msg_id,
            )
        )
        self.emu._notify()
        return _robot_error(0, "ok")

    def expire_sessions(self) -> None:
        for session in self.sessions.values():
            session.expires_ms = 0

    # -- proactive sends ---------------------------------------------------------------------------------

    def _robot_code(self, call: _Call, body: dict[str, Any]) -> None:
        code = body.get("robotCode")
        if not code:
            raise ApiError(400, "invalidParameter.robotCode.empty", "robotCode is empty")
        assert call.app is not None
        if code != self.emu.robot_code(call.app):
            raise ApiError(
                400, "invalidParameter.robotCode.auth", "robotCode does not belong to the app"
            )

    @staticmethod
    def _msg_param(body: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        key = body.get("msgKey")
        if key not in _MSG_KEYS:
            raise ApiError(400, "invalidParameter.msgKey", f"unknown msgKey {key!r}")
        raw = body.get("msgParam")
        if not isinstance(raw, str):
            raise ApiError(400, "invalidParameter.msgParam", "msgParam must be a JSON string")
        if len(raw.encode()) > MSG_PARAM_LIMIT:
            raise ApiError(400, "invalidParameter.msgParam.tooLong", "msgParam is too long")
        try:
            param = json.loads(raw)
        except ValueError:
            raise ApiError(400, "invalidParameter.msgParam", "msgParam is not valid JSON") from None
        if not isinstance(param, dict):
            raise ApiError(400, "invalidParameter.msgParam", "msgParam must be a JSON object")
        return key, _MSG_KEYS[key], param

    def _record(
        self,
        via: str,
        call: _Call,
        body: dict[str, Any],
        key: str,
        msgtype: str,
        param: dict[str, Any],
        conversation_id: str | None,
        conversation_type: str | None,
        user: str | None,
    ) -> None:
        text = param.get("content") if msgtype == "text" else param.get("text", "")
        self.emu.sent.append(
            SentReply(
                via=via,
                app=call.app,
                conversation_id=conversation_id,
                conversation_type=conversation_type,
                user_id=user,
                msgtype=msgtype,
                text=str(text or ""),
                title=str(param.get("title") or ""),
                at=None,
                body=body,
                time=time.monotonic(),
                msg_key=key,
            )
        )

    async def group_send(self, call: _Call) -> Any:
        body = call.body if isinstance(call.body, dict) else {}
        self._robot_code(call, body)
        key, msgtype, param = self._msg_param(body)
        cid = body.get("openConversationId")
        conversation = self.emu.conversations.get(cid) if isinstance(cid, str) else None
        if conversation is None or conversation.app != call.app or conversation.type != "2":
            raise ApiError(400, "invalidParameter.openConversationId", f"unknown group {cid!r}")
        self._record("group", call, body, key, msgtype, param, cid, "2", None)
        self.emu._notify()
        return {"processQueryKey": uuid.uuid4().hex}

    async def batch_send(self, call: _Call) -> Any:
        body = call.body if isinstance(call.body, dict) else {}
        self._robot_code(call, body)
        key, msgtype, param = self._msg_param(body)
        users = body.get("userIds")
        if not isinstance(users, list) or not users or not all(isinstance(u, str) for u in users):
            raise ApiError(400, "invalidParameter.userIds", "userIds must be a non-empty list")
        if len(users) > BATCH_LIMIT:
            raise ApiError(
                400, "invalidParameter.userIds.tooMany", f"at most {BATCH_LIMIT} userIds"
            )
        assert call.app is not None
        known = self.emu.users.get(call.app, set())
        invalid = [u for u in users if u not in known]
        for user in users:
            if user in known:
                conversation = self.emu.single_conversation(call.app, user)
                self._record("otm", call, body, key, msgtype, param, conversation, "1", user)
        self.emu._notify()
        return {
            "processQueryKey": uuid.uuid4().hex,
            "invalidStaffIdList": invalid,
            "flowControlledStaffIdList": [],
        }

    # -- files ---------------------------------------------------------------------------------------

    def add_file(self, app: str, content: bytes, file_name: str, content_type: str) -> StoredFile:
        stored = StoredFile(app, download_code(), content, file_name, content_type)
        self.files[stored.code] = stored
        self.files_by_url[stored.url_token] = stored
        return stored

    async def download(self, call: _Call) -> Any:
        body = call.body if isinstance(call.body, dict) else {}
        self._robot_code(call, body)
        code = body.get("downloadCode")
        stored = self.files.get(code) if isinstance(code, str) else None
        if stored is None or stored.app != call.app:
            raise ApiError(400, "invalidParameter.downloadCode", "下载码有误或者已经过期")
        expires = int(time.time()) + 3600
        return {"downloadUrl": f"{self.emu.url}/files/{stored.url_token}?Expires={expires}"}

    async def serve_file(self, call: _Call) -> Any:
        stored = self.files_by_url.get(call.request.match_info["token"])
        if stored is None:
            raise ApiError(404, "NotFound", "file not found")
        return web.Response(body=stored.content, content_type=stored.content_type)
