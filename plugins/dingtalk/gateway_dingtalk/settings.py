"""The ``[settings]`` table of a ``dingtalk-stream`` instance."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from gateway.secrets import Secret

__all__ = ["DEFAULT_ENDPOINT", "DingTalkSettings"]

DEFAULT_ENDPOINT = "https://api.dingtalk.com"
_positive: Any = attrs.validators.gt(0)  # shared by int and float fields


def _four(_instance: object, attribute: attrs.Attribute[list[str]], value: list[str]) -> None:
    if len(value) != 4 or len(set(value)) != 4:
        raise ValueError("must be four distinct strings")


@attrs.frozen
class DingTalkSettings:
    client_id: str = attrs.field(
        validator=attrs.validators.min_len(1),
        metadata={"help": "the app's Client ID (AppKey), from the developer console"},
    )
    client_secret: Secret = attrs.field(
        metadata={"help": "the app's Client Secret (AppSecret); keep it in the environment"}
    )
    robot_code: str = attrs.field(
        default="", metadata={"help": "the robot's code; empty means the client id (internal apps)"}
    )
    endpoint: str = attrs.field(
        default=DEFAULT_ENDPOINT,
        metadata={"help": "OpenAPI and stream gateway base URL (tests and private deployments)"},
    )
    proxy: str = attrs.field(
        default="",
        metadata={"help": "socks5://, socks4:// or http:// proxy for the websocket and HTTP calls"},
    )
    reply_mode: Literal["ai_card", "card", "markdown", "text"] = attrs.field(
        default="ai_card",
        metadata={
            "help": "ai_card: streamed AI card with feedback; card: legacy interactive card (apps "
            "created before 2025, no feedback); markdown/text: one message per answer"
        },
    )
    card_template_id: str = attrs.field(
        default="",
        metadata={
            "help": "AI card template id (ai_card mode), from DingTalk's card builder",
            "ask": True,
        },
    )
    card_content_key: str = attrs.field(
        default="content", metadata={"help": "template variable of the streamed markdown text"}
    )
    card_feedback_key: str = attrs.field(
        default="feedback",
        metadata={"help": "template variable set to '1' to show the feedback buttons; '' = none"},
    )
    card_rating_key: str = attrs.field(
        default="rating",
        metadata={"help": "template variable that shows the label a user picked; '' = none"},
    )
    card_label_keys: list[str] = attrs.field(
        factory=lambda: ["label1", "label2", "label3", "label4"],
        validator=_four,
        metadata={"help": "template variables holding the four button labels"},
    )
    card_action_ids: list[str] = attrs.field(
        factory=lambda: ["feedback1", "feedback2", "feedback3", "feedback4"],
        validator=_four,
        metadata={"help": "the template's action ids of the four feedback buttons"},
    )
    thinking_text: str = attrs.field(
        default="思考中…", metadata={"help": "shown while the agent has not answered yet"}
    )
    feedback_labels: list[str] = attrs.field(
        factory=lambda: ["😄 非常有帮助", "😊 有帮助", "🙂 帮助不大", "😅 没帮助"],
        validator=_four,
        metadata={"help": "the four feedback button labels"},
    )
    feedback_values: list[str] = attrs.field(
        factory=lambda: ["very_helpful", "helpful", "not_helpful", "unhelpful"],
        validator=_four,
        metadata={"help": "the rating recorded for each button"},
    )
    card_update_interval: float = attrs.field(
        default=0.8,
        validator=attrs.validators.ge(0),
        metadata={"help": "minimum seconds between two updates of one card"},
    )
    rate: float = attrs.field(
        default=20.0,
        validator=_positive,
        metadata={"help": "OpenAPI requests per second for this app (DingTalk's quota: 20)"},
    )
    card_max_length: int = attrs.field(
        default=3000,
        validator=attrs.validators.ge(100),
        metadata={"help": "characters per card; a longer answer continues in a new card"},
    )
    message_max_length: int = attrs.field(
        default=3500,
        validator=attrs.validators.ge(100),
        metadata={"help": "characters per markdown/text message"},
    )
    frame_timeout: float = attrs.field(
        default=90.0,
        validator=_positive,
        metadata={"help": "reconnect when no frame (not even a ping) arrived for this long"},
    )
    request_timeout: float = attrs.field(
        default=10.0, validator=_positive, metadata={"help": "seconds for one OpenAPI call"}
    )
    degrade_after: int = attrs.field(
        default=3,
        validator=attrs.validators.ge(1),
        metadata={"help": "card failures in a row after which answers go out as markdown"},
    )
    degrade_for: float = attrs.field(
        default=300.0,
        validator=attrs.validators.ge(0),
        metadata={"help": "seconds to stay on markdown before trying cards again"},
    )

    def __attrs_post_init__(self) -> None:
        if self.reply_mode == "ai_card" and not self.card_template_id:
            raise ValueError(
                "card_template_id is required in reply_mode 'ai_card' (or choose markdown/text)"
            )
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError("endpoint must be an http:// or https:// URL")
        if self.proxy and not self.proxy.startswith(("socks5://", "socks4://", "http://")):
            raise ValueError("proxy must start with socks5://, socks4:// or http://")

    @property
    def robot(self) -> str:
        return self.robot_code or self.client_id
