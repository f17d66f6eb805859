"""The ``[settings]`` table of a ``dingtalk-stream`` instance."""

from __future__ import annotations

from typing import Literal

import attrs

from gateway.config.fields import (
    degrade_after_field,
    degrade_for_field,
    feedback_labels_field,
    feedback_values_field,
    four_distinct,
    positive,
    proxy_field,
    request_timeout_field,
)
from gateway.proxy import check_proxy_url
from gateway.secrets import Secret

__all__ = ["DEFAULT_ENDPOINT", "DingTalkSettings"]

DEFAULT_ENDPOINT = "https://api.dingtalk.com"


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
    proxy: str = proxy_field()
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
        validator=four_distinct,
        metadata={"help": "template variables holding the four button labels"},
    )
    card_action_ids: list[str] = attrs.field(
        factory=lambda: ["feedback1", "feedback2", "feedback3", "feedback4"],
        validator=four_distinct,
        metadata={"help": "the template's action ids of the four feedback buttons"},
    )
    thinking_text: str = attrs.field(
        default="思考中…", metadata={"help": "shown while the agent has not answered yet"}
    )
    feedback_labels: list[str] = feedback_labels_field()
    feedback_values: list[str] = feedback_values_field()
    card_update_interval: float = attrs.field(
        default=0.8,
        validator=attrs.validators.ge(0),
        metadata={"help": "minimum seconds between two updates of one card"},
    )
    rate: float = attrs.field(
        default=20.0,
        validator=positive,
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
        validator=positive,
        metadata={"help": "reconnect when no frame (not even a ping) arrived for this long"},
    )
    request_timeout: float = request_timeout_field()
    degrade_after: int = degrade_after_field("markdown")
    degrade_for: float = degrade_for_field("markdown")

    def __attrs_post_init__(self) -> None:
        if self.reply_mode == "ai_card" and not self.card_template_id:
            raise ValueError(
                "card_template_id is required in reply_mode 'ai_card' (or choose markdown/text)"
            )
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError("endpoint must be an http:// or https:// URL")
        check_proxy_url(self.proxy)

    @property
    def robot(self) -> str:
        return self.robot_code or self.client_id
