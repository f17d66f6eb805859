"""Card state and the card APIs (research doc §3.4-§3.6).

Advanced/AI cards: ``POST /v1.0/card/instances`` (create), ``POST /v1.0/card/instances/deliver``,
``POST /v1.0/card/instances/createAndDeliver``, ``PUT /v1.0/card/instances`` (update),
``PUT /v1.0/card/streaming``.  Legacy "StandardCard" cards: ``POST
/v1.0/im/v1.0/robot/interactiveCards/send`` and ``PUT /v1.0/im/robots/interactiveCards``.

Codes DingTalk documents are used as documented; where the doc names no code, the emulator uses a
code of its own in the same style (marked "emulator code" below).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from gateway_dingtalk.emulator._faults import ApiError
from gateway_dingtalk.emulator._records import (
    CardState,
    CardUpdate,
    ConcurrentCardUpdate,
    Violation,
)

if TYPE_CHECKING:
    from gateway_dingtalk.emulator._server import DingTalkEmulator, _Call

__all__ = ["CardApi"]

_SPACE = re.compile(r"dtv1\.card//([A-Z_]+)\.(.+)")
_CALLBACK_TYPES = ("STREAM", "HTTP")
_MAX_KEY_BYTES = 100


def _bad(code: str, message: str, status: int = 400) -> ApiError:
    return ApiError(status, code, message)


def _nonempty(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


class CardApi:
    def __init__(self, emu: DingTalkEmulator) -> None:
        self.emu = emu
        self._in_flight: dict[str, list[str]] = {}

    # -- helpers ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _flight(self, out_track_id: str, path: str) -> AsyncIterator[None]:
        """One request for a card in flight; a second one meanwhile is DingTalk's "并发保护"."""
        emu = self.emu
        others = self._in_flight.get(out_track_id)
        if others:
            rejected = emu.strict_card_concurrency
            emu.concurrent_card_updates.append(
                ConcurrentCardUpdate(out_track_id, path, tuple(others), time.monotonic(), rejected)
            )
            emu.violations.append(
                Violation(
                    "concurrent_card_update",
                    f"{path} for {out_track_id} while {', '.join(others)} in flight",
                    None,
                    time.monotonic(),
                )
            )
            if rejected:
                # emulator code: the doc reports a 403 "并发保护" without naming the code
                raise _bad(
                    "Forbidden.ConcurrencyProtection", "并发保护：同一卡片的请求正在处理中", 403
                )
        entries = self._in_flight.setdefault(out_track_id, [])
        entries.append(path)
        try:
            if emu.card_latency > 0:
                await asyncio.sleep(emu.card_latency)
            yield
        finally:
            entries.remove(path)
            if not entries:
                self._in_flight.pop(out_track_id, None)

    def _template_vars(self, template_id: Any) -> frozenset[str]:
        if not _nonempty(template_id) or template_id not in self.emu.templates:
            raise _bad("param.templateNotExist", f"template {template_id!r} does not exist")
        return self.emu.templates[template_id]

    def _param_map(self, variables: frozenset[str] | None, raw: Any, where: str) -> dict[str, str]:
        """Validate a ``{"cardParamMap": {...}}`` object: string keys of the template, string values."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise _bad("param.cardDataInvalid", f"{where} must be an object")  # emulator code
        params = raw.get("cardParamMap", {})
        if params is None:
            return {}
        if not isinstance(params, dict):
            raise _bad("param.cardDataInvalid", f"{where}.cardParamMap must be an object")
        limit = self.emu.max_param_value_bytes
        for key, value in params.items():
            if len(key.encode()) > _MAX_KEY_BYTES:
                raise _bad("param.cardParamMapKeyTooLong", f"{where}: key {key[:20]!r}… too long")
            if variables is not None and key not in variables:
                # emulator code: DingTalk's behaviour for unknown keys is not documented
                raise _bad(
                    "param.cardParamMapKeyNotInTemplate",
                    f"{where}: {key!r} is not a variable of the template",
                )
            if not isinstance(value, str):
                # cardParamMap accepts only strings (doc §3.5); emulator code
                raise _bad(
                    "param.cardParamMapValueNotString",
                    f"{where}: the value of {key!r} must be a string, not {type(value).__name__}",
                )
            if limit is not None and len(value.encode()) > limit:
                raise _bad(
                    "param.cardParamMapValueTooLong", f"{where}: the value of {key!r} is too long"
                )
        return dict(params)

    def _private(self, variables: frozenset[str] | None, raw: Any) -> dict[str, dict[str, str]]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise _bad("param.privateDataInvalid", "privateData must be an object")
        return {
            str(user): self._param_map(variables, data, f"privateData.{user}")
            for user, data in raw.items()
        }

    def _callback_type(self, body: dict[str, Any]) -> str | None:
        value = body.get("callbackType")
        if value is None:
            return None
        if value not in _CALLBACK_TYPES:
            raise _bad(
                "param.callbackTypeInvalid", f"callbackType must be STREAM or HTTP, not {value!r}"
            )
        return str(value)

    def _spaces(self, app: str, body: dict[str, Any]) -> list[tuple[str, str, str]]:
        """Validate ``openSpaceId`` (``;``-separated) and its deliver models: (type, id, raw)."""
        emu = self.emu
        raw = body.get("openSpaceId")
        if not _nonempty(raw):
            raise _bad("param.openSpaceIdInvalid", "openSpaceId is empty")
        id_type = body.get("userIdType", 1)
        if id_type not in (1, 2):
            raise _bad("param.userIdTypeInvalid", f"userIdType must be 1 or 2, not {id_type!r}")
        robot_code = emu.robot_code(app)
        spaces: list[tuple[str, str, str]] = []
        for part in str(raw).split(";"):
            match = _SPACE.fullmatch(part)
            if match is None:
                raise _bad("param.openSpaceIdInvalid", f"invalid openSpaceId {part!r}")
            space_type, space_id = match.groups()
            if space_type == "IM_GROUP":
                model = body.get("imGroupOpenDeliverModel")
                if not isinstance(model, dict):
                    raise _bad(
                        "param.imGroupOpenDeliverModelEmpty", "imGroupOpenDeliverModel is required"
                    )
                if model.get("robotCode") != robot_code:
                    raise _bad(
                        "param.robotCodeInvalid",
                        f"imGroupOpenDeliverModel.robotCode must be {robot_code!r}",
                    )
                conversation = emu.conversations.get(space_id)
                if conversation is None or conversation.app != app or conversation.type != "2":
                    raise _bad("param.openSpaceIdInvalid", f"unknown group {space_id!r}")
            elif space_type == "IM_ROBOT":
                model = body.get("imRobotOpenDeliverModel")
                if not isinstance(model, dict):
                    raise _bad(
                        "param.imRobotOpenDeliverModelEmpty", "imRobotOpenDeliverModel is required"
                    )
                if model.get("spaceType", "IM_ROBOT") != "IM_ROBOT":
                    raise _bad("param.imRobotOpenDeliverModelInvalid", "spaceType must be IM_ROBOT")
                if "robotCode" in model and model["robotCode"] != robot_code:
                    raise _bad("param.robotCodeInvalid", f"robotCode must be {robot_code!r}")
                if id_type == 1 and space_id not in emu.users.get(app, set()):
                    raise _bad("param.openSpaceIdInvalid", f"unknown user {space_id!r}")
            else:
                raise _bad("param.openSpaceIdInvalid", f"space type {space_type} is not emulated")
            spaces.append((space_type, space_id, part))
        return spaces

    def _card(self, app: str, out_track_id: Any, code: str = "param.cardNotExist") -> CardState:
        card = self.emu.cards.get(out_track_id) if isinstance(out_track_id, str) else None
        if card is None or card.app != app or card.legacy:
            raise _bad(code, "card is not exist")
        return card

    @staticmethod
    def _deliver_results(spaces: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
        return [
            {"spaceType": kind, "spaceId": space_id, "success": True, "carrierId": uuid.uuid4().hex}
            for kind, space_id, _ in spaces
        ]

    def _create(
        self, call: _Call, body: dict[str, Any], spaces: list[tuple[str, str, str]]
    ) -> CardState:
        assert call.app is not None
        template_id = body["cardTemplateId"]
        variables = self.emu.templates[template_id]
        param_map = self._param_map(variables, body.get("cardData"), "cardData")
        private = self._private(variables, body.get("privateData"))
        out_track_id = body["outTrackId"]
        if out_track_id in self.emu.cards:
            raise _bad("param.cardAlreadyExist", f"card {out_track_id} already exists")
        now = time.monotonic()
        card = CardState(
            out_track_id=out_track_id,
            template_id=template_id,
            app=call.app,
            robot_code=self.emu.robot_code(call.app),
            callback_type=self._callback_type(body),
            created_at=now,
            param_map=param_map,
            private_data=private,
            spaces=[raw for _, _, raw in spaces],
        )
        card.history.append(
            CardUpdate("create", now, dict(param_map), replace=True, status=card.status)
        )
        self.emu.cards[out_track_id] = card
        return card

    @staticmethod
    def _require_body(call: _Call) -> dict[str, Any]:
        if not isinstance(call.body, dict):
            raise _bad("param.error", "the body must be a JSON object")
        return call.body

    def _check_create(self, body: dict[str, Any]) -> None:
        if not _nonempty(body.get("outTrackId")):
            raise _bad("param.outTrackIdEmpty", "outTrackId is empty")
        self._template_vars(body.get("cardTemplateId"))
        self._callback_type(body)

    # -- advanced cards ----------------------------------------------------------------------------

    async def create_and_deliver(self, call: _Call) -> Any:
        body = self._require_body(call)
        self._check_create(body)
        assert call.app is not None
        async with self._flight(body["outTrackId"], call.path):
            spaces = self._spaces(call.app, body)
            card = self._create(call, body, spaces)
        return {
            "success": True,
            "result": {
                "outTrackId": card.out_track_id,
                "deliverResults": self._deliver_results(spaces),
            },
        }

    async def create(self, call: _Call) -> Any:
        body = self._require_body(call)
        self._check_create(body)
        async with self._flight(body["outTrackId"], call.path):
            card = self._create(call, body, [])
        return {"success": True, "result": card.out_track_id}

    async def deliver(self, call: _Call) -> Any:
        body = self._require_body(call)
        assert call.app is not None
        card = self._card(call.app, body.get("outTrackId"))
        async with self._flight(card.out_track_id, call.path):
            spaces = self._spaces(call.app, body)
            card.spaces.extend(raw for _, _, raw in spaces)
            card.history.append(
                CardUpdate(
                    "deliver",
                    time.monotonic(),
                    {"openSpaceId": body["openSpaceId"]},
                    status=card.status,
                )
            )
        return {"success": True, "result": self._deliver_results(spaces)}

    async def update(self, call: _Call) -> Any:
        body = self._require_body(call)
        assert call.app is not None
        card = self._card(call.app, body.get("outTrackId"))
        async with self._flight(card.out_track_id, call.path):
            variables = self.emu.templates.get(card.template_id)
            card_data, private_raw = body.get("cardData"), body.get("privateData")
            if not card_data and not private_raw:
                raise _bad(
                    "param.cardDataAndPrivateDataBothEmpty",
                    "cardData and privateData are both empty",
                )
            params = self._param_map(variables, card_data, "cardData")
            private = self._private(variables, private_raw)
            options = body.get("cardUpdateOptions") or {}
            self.apply(
                card,
                params if card_data else None,
                private,
                by_key=bool(options.get("updateCardDataByKey", False)),
                private_by_key=bool(options.get("updatePrivateDataByKey", False)),
                source="update",
            )
        return {"success": True, "result": True}

    async def streaming(self, call: _Call) -> Any:
        emu = self.emu
        body = self._require_body(call)
        assert call.app is not None
        out_track_id = body.get("outTrackId")
        if not _nonempty(out_track_id):
            raise _bad("param.stream.outTrackId", "outTrackId is empty")
        if not _nonempty(body.get("guid")):
            raise _bad("param.stream.guidEmpty", "guid is empty")
        if not _nonempty(body.get("key")):
            raise _bad("param.stream.keyEmpty", "key is empty")
        if not _nonempty(body.get("content")):
            raise _bad("param.stream.contentEmpty", "content is empty")
        card = self._card(call.app, out_track_id, "param.stream.outTrackId")
        guid, key, content = body["guid"], body["key"], body["content"]
        async with self._flight(card.out_track_id, call.path):
            if guid in card.guids:
                return {"success": True, "result": True}  # idempotent: already applied
            variables = emu.templates.get(card.template_id)
            if variables is not None and key not in variables:
                raise _bad("param.stream.keyNotExist", f"{key!r} is not a variable of the template")
            if body.get("isFull") is not True:
                raise _bad("param.stream.isFull", "isFull must be true for a markdown variable")
            limit = emu.max_stream_content_bytes
            if limit is not None and len(content.encode()) > limit:
                raise _bad("param.stream.content", "content is too large")
            if card.ended:
                emu.violations.append(
                    Violation(
                        "stream_after_end",
                        f"streaming to {card.out_track_id} after it {card.status}",
                        None,
                        time.monotonic(),
                    )
                )
                raise _bad("param.stream.cardFinished", f"card is {card.status}")  # emulator code
            is_finalize, is_error = bool(body.get("isFinalize")), bool(body.get("isError"))
            card.guids.add(guid)
            card.content[key] = content
            card.param_map[key] = content
            card.status = "failed" if is_error else "finished" if is_finalize else "streaming"
            card.history.append(
                CardUpdate(
                    "streaming",
                    time.monotonic(),
                    {key: content},
                    key=key,
                    guid=guid,
                    is_finalize=is_finalize,
                    is_error=is_error,
                    status=card.status,
                )
            )
        return {"success": True, "result": True}

    def apply(
        self,
        card: CardState,
        params: dict[str, Any] | None,
        private: dict[str, dict[str, Any]],
        *,
        by_key: bool,
        private_by_key: bool,
        source: str,
    ) -> None:
        if params is not None:
            if by_key:
                card.param_map.update(params)
            else:
                card.param_map = dict(params)
        for user, data in private.items():
            if private_by_key:
                card.private_data.setdefault(user, {}).update(data)
            else:
                card.private_data[user] = dict(data)
        changes = dict(params or {})
        if private:
            changes["@private"] = private
        card.history.append(
            CardUpdate(source, time.monotonic(), changes, replace=not by_key, status=card.status)
        )

    def apply_callback_response(self, card: CardState, user_id: str, response: Any) -> bool:
        """Apply what a card-click ack returned (``{"cardData", "userPrivateData",
        "cardUpdateOptions"}``); False if there was nothing to apply or it was invalid."""
        if not isinstance(response, dict):
            return False
        card_data, user_private = response.get("cardData"), response.get("userPrivateData")
        if card_data is None and user_private is None:
            return False
        variables = self.emu.templates.get(card.template_id)
        try:
            params = (
                self._param_map(variables, card_data, "response.cardData") if card_data else None
            )
            private = (
                {user_id: self._param_map(variables, user_private, "response.userPrivateData")}
                if user_private
                else {}
            )
        except ApiError as error:
            self.emu.violations.append(
                Violation("bad_card_response", error.message, None, time.monotonic())
            )
            return False
        options = response.get("cardUpdateOptions") or {}
        self.apply(
            card,
            params,
            private,
            by_key=bool(options.get("updateCardDataByKey", False)),
            private_by_key=bool(options.get("updatePrivateDataByKey", False)),
            source="callback",
        )
        return True

    # -- legacy interactive cards ---------------------------------------------------------------------

    def _legacy_data(self, raw: Any) -> dict[str, Any]:
        if not isinstance(raw, str):
            raise _bad("param.error", "cardData must be a JSON string")
        try:
            data = json.loads(raw)
        except ValueError:
            raise _bad("param.error", "cardData is not valid JSON") from None
        if not isinstance(data, dict):
            raise _bad("param.error", "cardData must be a JSON object")
        return data

    async def legacy_send(self, call: _Call) -> Any:
        emu = self.emu
        body = self._require_body(call)
        assert call.app is not None
        if body.get("cardTemplateId") != "StandardCard":
            raise _bad("template.isNotExist", "cardTemplateId must be StandardCard")
        if body.get("robotCode") != emu.robot_code(call.app):
            raise _bad("invalid.robotCode", "robotCode is invalid")
        group, single = body.get("openConversationId"), body.get("singleChatReceiver")
        if bool(group) == bool(single):
            raise _bad(
                "param.error",
                "exactly one of openConversationId and singleChatReceiver is required",
            )
        if group:
            conversation = emu.conversations.get(group) if isinstance(group, str) else None
            if conversation is None or conversation.app != call.app or conversation.type != "2":
                raise _bad("invalid.openConversationId", f"unknown group {group!r}")
            space = f"dtv1.card//IM_GROUP.{group}"
        else:
            try:
                receiver = json.loads(single) if isinstance(single, str) else None
            except ValueError:
                receiver = None
            user = receiver.get("userId") if isinstance(receiver, dict) else None
            if not _nonempty(user):
                raise _bad(
                    "param.error", 'singleChatReceiver must be a JSON string {"userId": ...}'
                )
            if user not in emu.users.get(call.app, set()):
                raise _bad("param.error", f"unknown user {user!r}")
            space = f"dtv1.card//IM_ROBOT.{user}"
        biz_id = body.get("cardBizId")
        if not isinstance(biz_id, str) or not 0 < len(biz_id) <= 100:
            raise _bad("invalid.bizId", "cardBizId must be 1 to 100 characters")
        data = self._legacy_data(body.get("cardData"))
        existing = emu.cards.get(biz_id)
        if existing is not None:
            if not existing.legacy or existing.app != call.app:
                raise _bad("invalid.bizId", "cardBizId is used by another card")
            return {"processQueryKey": existing.out_track_id}  # idempotent
        async with self._flight(biz_id, call.path):
            now = time.monotonic()
            card = CardState(
                out_track_id=biz_id,
                template_id="StandardCard",
                app=call.app,
                robot_code=emu.robot_code(call.app),
                callback_type="HTTP" if body.get("callbackUrl") else None,
                created_at=now,
                param_map=data,
                spaces=[space],
                status="sent",
                legacy=True,
            )
            card.history.append(CardUpdate("create", now, dict(data), replace=True, status="sent"))
            emu.cards[biz_id] = card
        return {"processQueryKey": biz_id}

    async def legacy_update(self, call: _Call) -> Any:
        emu = self.emu
        body = self._require_body(call)
        biz_id = body.get("cardBizId")
        card = emu.cards.get(biz_id) if isinstance(biz_id, str) else None
        if card is None or not card.legacy or card.app != call.app:
            raise _bad("cardInstance.notExist", "card instance does not exist")
        data = self._legacy_data(body.get("cardData"))
        options = body.get("updateOptions") or {}
        async with self._flight(card.out_track_id, call.path):
            self.apply(
                card,
                data,
                {},
                by_key=bool(options.get("updateCardDataByKey", False)),
                private_by_key=False,
                source="legacy",
            )
        return {"processQueryKey": card.out_track_id}
