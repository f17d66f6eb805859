"""The ``[settings]`` table of a ``feishu`` instance (Feishu or Lark, the domain says which)."""

from __future__ import annotations

from typing import Literal

import attrs

from gateway.config.fields import (
    degrade_after_field,
    degrade_for_field,
    feedback_labels_field,
    feedback_values_field,
    positive,
    proxy_field,
    request_timeout_field,
)
from gateway.proxy import check_proxy_url
from gateway.secrets import Secret

__all__ = ["DOMAINS", "MAX_TEXT_LENGTH", "MIN_CARD_INTERVAL", "FeishuSettings"]

#: The two public clouds; anything else must be an http(s) URL (a private deployment, a test).
DOMAINS = {"feishu": "https://open.feishu.cn", "lark": "https://open.larksuite.com"}
#: CardKit allows 10 operations a second on one card: a shorter interval would only earn refusals.
MIN_CARD_INTERVAL = 0.1
#: A card, and the post a failed card falls back to, hold at most 30 KB of JSON, and a character
#: may take 4 bytes (emoji) in it: 6000 leave room for the buttons and an error note.
MAX_TEXT_LENGTH = 6000


def _card_interval(_instance: object, _attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= MIN_CARD_INTERVAL:
        raise ValueError(
            f"must be at least {MIN_CARD_INTERVAL} s: Feishu allows 10 operations a second on one "
            f"card (got {value!r})"
        )


def _text_length(_instance: object, _attribute: attrs.Attribute[int], value: int) -> None:
    if not 100 <= value <= MAX_TEXT_LENGTH:
        raise ValueError(
            f"must be between 100 and {MAX_TEXT_LENGTH} characters: a card or post holds at most "
            f"30 KB, and a character can take 4 bytes (got {value!r})"
        )


@attrs.frozen
class FeishuSettings:
    app_id: str = attrs.field(
        validator=attrs.validators.min_len(1),
        metadata={"help": "the app's App ID (cli_...), from the developer console"},
    )
    app_secret: Secret = attrs.field(
        metadata={"help": "the app's App Secret; keep it in the environment"}
    )
    domain: str = attrs.field(
        default="feishu",
        metadata={
            "help": "feishu (open.feishu.cn), lark (open.larksuite.com) or an http(s):// base URL "
            "(private deployments, tests)"
        },
    )
    proxy: str = proxy_field()
    reply_mode: Literal["card", "text"] = attrs.field(
        default="card",
        metadata={
            "help": "card: a streamed CardKit card with feedback buttons; text: one message per "
            "part when the answer is complete (markdown rendered)"
        },
    )
    thinking_text: str = attrs.field(
        default="思考中…", metadata={"help": "shown in the card until the agent answers"}
    )
    error_prefix: str = attrs.field(
        default="⚠️", metadata={"help": "put before the error text of a failed answer"}
    )
    feedback_labels: list[str] = feedback_labels_field()
    feedback_values: list[str] = feedback_values_field()
    feedback_thanks: str = attrs.field(
        default="感谢反馈：{label}",
        metadata={"help": "the toast shown after a click; {label} is the button's label"},
    )
    card_update_interval: float = attrs.field(
        default=0.3,
        validator=_card_interval,
        metadata={
            "help": "minimum seconds between two calls for one card, at least 0.1 (Feishu allows "
            "10/s)"
        },
    )
    rate: float = attrs.field(
        default=40.0,
        validator=positive,
        metadata={"help": "OpenAPI requests per second for this app (Feishu's quota: 50)"},
    )
    max_text_length: int = attrs.field(
        # A card holds at most 30 KB of JSON; 4000 characters of CJK text stay well below it.
        default=4000,
        validator=_text_length,
        metadata={
            "help": "characters per card or message (100 to 6000: a card holds at most 30 KB); a "
            "longer answer continues in another"
        },
    )
    frame_timeout: float = attrs.field(
        default=300.0,
        validator=positive,
        metadata={
            "help": "reconnect when no frame (not even a pong) arrived for this long; keep it "
            "above the ping interval (120 s unless Feishu says otherwise)"
        },
    )
    request_timeout: float = request_timeout_field()
    degrade_after: int = degrade_after_field("messages")
    degrade_for: float = degrade_for_field("messages")

    def __attrs_post_init__(self) -> None:
        if self.domain not in DOMAINS and not self.domain.startswith(("http://", "https://")):
            raise ValueError("domain must be 'feishu', 'lark' or an http:// or https:// URL")
        check_proxy_url(self.proxy)

    @property
    def base_url(self) -> str:
        """The OpenAPI and long-connection endpoint base, without a trailing slash."""
        return DOMAINS.get(self.domain, self.domain).rstrip("/")
