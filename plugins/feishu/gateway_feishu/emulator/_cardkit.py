"""CardKit v1: card entities, streaming element content, settings and full updates.

From the docs (open.feishu.cn ``cardkit-v1/card/create``, ``card-element/content``,
``card/settings``, ``card/update``): every operation on a card carries a ``sequence`` that must be
strictly greater than the previous one on that card (300317); text can be streamed only while
``config.streaming_mode`` is true (300309), which Feishu switches off by itself 10 minutes after it
was switched on (``streaming_timeout``): the next element content call gets 200850, later ones
300309, and settings or a full update work as on any card whose streaming is off; only the
creating app may touch a card (300311); cards are at most 30 KB (200860); ``update_multi: false``
is refused (300302); content updates are limited to 10/s per card and the API to 50/s per app.
The per-card limit's answer is not documented: here HTTP 429 with 99991400 like the app's limit,
but without the ``x-ogw-ratelimit-*`` headers of Feishu's API gateway (an assumption).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING, Any

from gateway_feishu.emulator._faults import RATE_LIMITED, ApiError
from gateway_feishu.emulator._payloads import dumps, new_card_id
from gateway_feishu.emulator._records import CardState, CardUpdate, Violation

if TYPE_CHECKING:
    from gateway_feishu.emulator._server import FeishuEmulator, _Call

__all__ = ["CardKit"]

_CARD_LIMIT = 30 * 1024
_TEXT_TAGS = ("markdown", "plain_text")
_MAX_SEQUENCE = 2**31 - 1


def _text_elements(node: Any, found: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """element_id -> (tag, content) of every markdown/plain_text element, in card order."""
    if isinstance(node, dict):
        element_id = node.get("element_id")
        if isinstance(element_id, str):
            content = node.get("content")
            found[element_id] = (str(node.get("tag")), content if isinstance(content, str) else "")
        for value in node.values():
            _text_elements(value, found)
    elif isinstance(node, list):
        for value in node:
            _text_elements(value, found)
    return found


def _card_json(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, str) or not raw.strip():
        raise ApiError(400, 300307, "The card DSL is empty")
    if len(raw.encode()) > _CARD_LIMIT:
        raise ApiError(400, 200860, "Card content exceeds limit.")
    try:
        data = json.loads(raw)
    except ValueError:
        raise ApiError(400, 200220, "Failed to generate card content") from None
    if not isinstance(data, dict):
        raise ApiError(400, 200220, "Failed to generate card content")
    config = data.get("config")
    if isinstance(config, dict) and config.get("update_multi") is False:
        raise ApiError(400, 300302, "update_multi property is false")
    return data


def _sequence(body: dict[str, Any]) -> int:
    sequence = body.get("sequence")
    if isinstance(sequence, bool) or not isinstance(sequence, int):
        raise ApiError.invalid_param("sequence must be an integer")
    if not 1 <= sequence <= _MAX_SEQUENCE:
        raise ApiError.invalid_param("sequence must be within 1..2147483647")
    return sequence


class CardKit:
    def __init__(self, emu: FeishuEmulator) -> None:
        self.emu = emu

    # -- shared checks ------------------------------------------------------------------------------

    def _card(self, call: _Call) -> CardState:
        card = self.emu.cards.get(call.request.match_info["card_id"])
        if card is None:
            raise ApiError(400, 200740, "The card entity does not exist")
        if card.app != call.app:
            raise ApiError(
                400,
                300311,
                "The current application does not have permission to update/use this card",
            )
        self.expire(card)
        return card

    def expire(self, card: CardState) -> None:
        """Apply Feishu's streaming timeout: streaming off once ``streaming_timeout`` seconds
        passed since it was switched on, and the next element content call will hear 200850."""
        if (
            card.streaming_mode
            and card.streaming_started_at is not None
            and time.monotonic() - card.streaming_started_at > self.emu.streaming_timeout
        ):
            card.data["config"]["streaming_mode"] = False
            card.timed_out_at = time.monotonic()
            card.timeout_unreported = True

    def _admit(self, call: _Call, api: str, card: CardState | None) -> None:
        emu = self.emu
        if card is not None and emu.card_rate_limit is not None:
            if not emu._admit("card", call.path, card.card_id, emu.card_rate_limit):
                # Undocumented: answered like the app's limit, minus the gateway's headers.
                raise ApiError(429, RATE_LIMITED, "request trigger frequency limit")
        emu.check_app_limits(call, "cardkit." + api)

    def _violation(self, kind: str, detail: str) -> None:
        self.emu.violations.append(Violation(kind, detail, None, time.monotonic()))

    def _replayed(self, card: CardState, body: dict[str, Any], kind: str) -> bool:
        """True if ``body.uuid`` was used on this card for this very operation (then it is not
        applied again); 200770 if it was used for another one."""
        uuid = body.get("uuid")
        if not isinstance(uuid, str) or not uuid:
            return False
        digest = hashlib.sha256((kind + dumps(body)).encode()).hexdigest()
        seen = card.uuids.get(uuid)
        if seen is None:
            card.uuids[uuid] = digest
            return False
        if seen == digest:
            return True
        raise ApiError(400, 200770, "UUID conflict")

    def _check_sequence(self, card: CardState, sequence: int) -> None:
        if sequence <= card.sequence:
            self._violation(
                "sequence_not_increasing",
                f"card {card.card_id}: sequence {sequence} after {card.sequence}",
            )
            raise ApiError(
                400,
                300317,
                "The sequence number for operating on the card did not increment consecutively",
            )

    def _set_data(self, card: CardState, data: dict[str, Any]) -> None:
        was_streaming = card.streaming_mode
        card.data = data
        card.contents = {
            key: text for key, (_, text) in _text_elements(data.get("body"), {}).items()
        }
        self._streaming_changed(card, was_streaming)

    def _streaming_changed(self, card: CardState, was_streaming: bool) -> None:
        if card.streaming_mode and not was_streaming:
            card.streaming_started_at = time.monotonic()
            card.timeout_unreported = False
        elif not card.streaming_mode and (was_streaming or card.timed_out_at is not None):
            # Switched off by the client (also after Feishu's timeout did): the card is final.
            card.closed = True

    # -- handlers -----------------------------------------------------------------------------------

    async def create(self, call: _Call) -> Any:
        assert call.app is not None
        body = call.body if isinstance(call.body, dict) else {}
        if body.get("type") != "card_json":
            raise ApiError.invalid_param("type must be card_json")
        data = _card_json(body.get("data"))
        self._admit(call, "create", None)
        card = CardState(new_card_id(), call.app, time.monotonic(), {})
        self._set_data(card, data)
        card.history.append(CardUpdate("create", time.monotonic()))
        self.emu.cards[card.card_id] = card
        return {"code": 0, "msg": "success", "data": {"card_id": card.card_id}}

    async def element_content(self, call: _Call) -> Any:
        body = call.body if isinstance(call.body, dict) else {}
        card = self._card(call)
        element_id = call.request.match_info["element_id"]
        content = body.get("content")
        if not isinstance(content, str) or not 1 <= len(content) <= 100_000:
            raise ApiError.invalid_param("content must be 1..100000 characters")
        sequence = _sequence(body)
        self._admit(call, "content", card)
        if self._replayed(card, body, "content"):
            return {"code": 0, "msg": "success", "data": {}}
        self._check_streaming(card)
        elements = _text_elements(card.data.get("body"), {})
        if element_id not in elements:
            raise ApiError.invalid_param(f"element {element_id!r} not found in the card")
        if elements[element_id][0] not in _TEXT_TAGS:
            raise ApiError(400, 300310, "Only update text")
        self._check_sequence(card, sequence)
        previous = card.contents.get(element_id, "")
        card.sequence = sequence
        card.contents[element_id] = content
        self._store_text(card.data.get("body"), element_id, content)
        card.history.append(
            CardUpdate(
                "content",
                time.monotonic(),
                sequence,
                element_id,
                content,
                body.get("uuid"),
                appended=content.startswith(previous),
            )
        )
        return {"code": 0, "msg": "success", "data": {}}

    def _check_streaming(self, card: CardState) -> None:
        if card.streaming_mode:
            return
        if card.timeout_unreported:
            card.timeout_unreported = False
            raise ApiError(400, 200850, "Card streaming timeout")
        if card.closed or card.timed_out_at is not None:
            self._violation(
                "update_after_close", f"card {card.card_id}: content after streaming closed"
            )
        raise ApiError(400, 300309, "Card streaming closed")

    def _store_text(self, node: Any, element_id: str, content: str) -> None:
        """Write streamed text into the card JSON, so a full read shows what users see."""
        if isinstance(node, dict):
            if node.get("element_id") == element_id:
                node["content"] = content
                return
            for value in node.values():
                self._store_text(value, element_id, content)
        elif isinstance(node, list):
            for value in node:
                self._store_text(value, element_id, content)

    async def settings(self, call: _Call) -> Any:
        body = call.body if isinstance(call.body, dict) else {}
        card = self._card(call)
        raw = body.get("settings")
        if not isinstance(raw, str) or not raw:
            raise ApiError.invalid_param("settings must be a JSON string")
        try:
            settings = json.loads(raw)
        except ValueError:
            raise ApiError.invalid_param("settings is not valid JSON") from None
        if not isinstance(settings, dict):
            raise ApiError.invalid_param("settings must be a JSON object")
        sequence = _sequence(body)
        self._admit(call, "settings", card)
        if self._replayed(card, body, "settings"):
            return {"code": 0, "msg": "success", "data": {}}
        config = settings.get("config")
        if config is None and "card_link" not in settings:
            # Feishu ignores keys outside config/card_link: streaming stays on (a common bug).
            self._violation(
                "settings_without_config",
                f"card {card.card_id}: settings {raw[:200]!r} change nothing",
            )
        if isinstance(config, dict) and config.get("update_multi") is False:
            raise ApiError(400, 300302, "update_multi property is false")
        self._check_sequence(card, sequence)
        card.sequence = sequence
        was_streaming = card.streaming_mode
        if isinstance(config, dict):
            merged = dict(card.data.get("config") or {})
            merged.update(config)
            card.data["config"] = merged
        if "card_link" in settings:
            card.data["card_link"] = settings["card_link"]
        self._streaming_changed(card, was_streaming)
        card.history.append(
            CardUpdate("settings", time.monotonic(), sequence, content=raw, uuid=body.get("uuid"))
        )
        return {"code": 0, "msg": "success", "data": {}}

    async def update(self, call: _Call) -> Any:
        body = call.body if isinstance(call.body, dict) else {}
        card = self._card(call)
        wrapped = body.get("card")
        if not isinstance(wrapped, dict) or wrapped.get("type") != "card_json":
            raise ApiError.invalid_param("card.type must be card_json")
        data = _card_json(wrapped.get("data"))
        sequence = _sequence(body)
        self._admit(call, "update", card)
        if self._replayed(card, body, "update"):
            return {"code": 0, "msg": "success", "data": {}}
        self._check_sequence(card, sequence)
        card.sequence = sequence
        self._set_data(card, data)
        card.history.append(
            CardUpdate(
                "update", time.monotonic(), sequence, content=wrapped["data"], uuid=body.get("uuid")
            )
        )
        return {"code": 0, "msg": "success", "data": {}}
