"""The DingTalk platform harness: the plugin's emulator seen through the contract suite's eyes."""

from __future__ import annotations

from typing import Any

from gateway.models import Incoming
from gateway_dingtalk._payload import incoming_from_dingtalk
from gateway_dingtalk.emulator import DEFAULT_APP, DEFAULT_SECRET, DingTalkEmulator
from gateway_testkit.harness import PlatformHarness, ReplyView

__all__ = ["TEMPLATE", "TEMPLATE_VARIABLES", "DingTalkHarness", "dingtalk_settings", "reply_id_for"]

TEMPLATE = "imgateway.test.schema"
#: the variables the driver's default settings use
TEMPLATE_VARIABLES = ("content", "feedback", "rating", "label1", "label2", "label3", "label4")


def dingtalk_settings(
    emulator: DingTalkEmulator,
    *,
    client_id: str = DEFAULT_APP,
    client_secret: str = DEFAULT_SECRET,
    **overrides: Any,
) -> dict[str, Any]:
    """A ``[settings]`` table for a ``dingtalk-stream`` instance talking to ``emulator``: the test
    template, no pacing between card calls, a generous rate; ``overrides`` win."""
    return {
        "client_id": client_id,
        "client_secret": client_secret,
        "endpoint": emulator.url,
        "card_template_id": TEMPLATE,
        "card_update_interval": 0.0,
        "rate": 1000.0,
        "frame_timeout": 10.0,
        **overrides,
    }


def reply_id_for(message_id: str, instance: str = "bot") -> str:
    """The reply id (the first card's ``outTrackId``) the core derives for ``message_id``."""
    return Incoming.create(
        instance=instance, message_id=message_id, conversation_id="-", sender_id="-", text=""
    ).reply_id


_STATES = {
    "processing": "thinking",
    "streaming": "streaming",
    "finished": "final",
    "failed": "failed",
}


def _showed_feedback(card: Any) -> bool:
    """The card's feedback buttons were switched on (they stay on record after a click)."""
    return any(update.changes.get("feedback") == "1" for update in card.history)


class DingTalkHarness(PlatformHarness):
    driver_type = "dingtalk-stream"
    max_text_length = 150

    def __init__(self, **emulator_options: Any) -> None:
        options = {"templates": {TEMPLATE: TEMPLATE_VARIABLES}, **emulator_options}
        self.emulator = DingTalkEmulator(**options)

    async def start(self) -> None:
        await self.emulator.start()

    async def close(self) -> None:
        await self.emulator.close()

    def settings(self) -> dict[str, Any]:
        return {
            "client_id": DEFAULT_APP,
            "client_secret": DEFAULT_SECRET,
            "endpoint": self.emulator.url,
            "card_template_id": TEMPLATE,
            "card_update_interval": 0.0,
            "card_max_length": self.max_text_length,
            "message_max_length": self.max_text_length,
            "rate": 1000.0,
            "frame_timeout": 10.0,
        }

    async def send(
        self, text: str, *, sender: str = "u1", conversation: str = "c1", message_id: str = ""
    ) -> str:
        sent = await self.emulator.send_message(
            text=text, sender_staff_id=sender, msg_id=message_id or None
        )
        await self.emulator.wait_acked(sent.msg_id, timeout=10)
        return sent.msg_id

    async def redeliver(self, message_id: str) -> None:
        push = await self.emulator.redeliver(message_id)
        await self.emulator.wait_acked(push.frame_id, timeout=10)

    def _cards(self, message_id: str) -> list[Any]:
        reply_id = self.reply_id(message_id)
        cards = []
        while card := self.emulator.cards.get(
            reply_id if not cards else f"{reply_id}.{len(cards)}"
        ):
            cards.append(card)
        return cards

    async def reply(self, message_id: str) -> ReplyView:
        cards = self._cards(message_id)
        if not cards:
            messages = self.emulator.replies(message_id)
            if not messages:
                return ReplyView("none", "", 0, 0)
            text = "".join(m.text for m in messages)
            return ReplyView("final", text, len(messages), 0)
        last = cards[-1]
        text = "".join(card.content.get("content", "") for card in cards)
        updates = sum(card.streaming_calls for card in cards) - sum(card.ended for card in cards)
        state = _STATES[last.status]
        if state == "final" and not _showed_feedback(last):
            # Every part but the last is finished without feedback buttons, and the next part's
            # card may not exist yet: the reply is final once its last card shows the buttons.
            state = "streaming"
        return ReplyView(state, text, len(cards), updates, text if state == "failed" else "")

    async def click_feedback(self, message_id: str, user: str, rating: str) -> None:
        last = self._cards(message_id)[-1]
        response = await self.emulator.click_card(
            None, last.out_track_id, user, params={"rating": rating}
        )
        if response is None:
            raise AssertionError("the driver did not acknowledge the card click in time")

    def leftover(self, message_id: str, text: str) -> Incoming:
        data = self.emulator.message(text=text, msg_id=message_id)
        return incoming_from_dingtalk(self.instance, data, frame_id="lost-frame")
