"""The ``[settings]`` table of a ``feishu`` instance (Feishu or Lark, the domain says which)."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from gateway.secrets import Secret

__all__ = ["DOMAINS", "MAX_TEXT_LENGTH", "MIN_CARD_INTERVAL", "FeishuSettings"]

#: The two public clouds; anything else must be an http(s) URL (a private deployment, a test).
DOMAINS = {"feishu": "https://open.feishu.cn", "lark": "https://open.larksuite.com"}
_positive: Any = attrs.validators.gt(0)  # shared by int and float fields
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


def _four(_instance: object, attribute: attrs.Attribute[list[str]], value: list[str]) -> None:
    if len(value) != 4 or len(set(value)) != 4:
        raise ValueError("must be four distinct strings")


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
    proxy: str = attrs.field(
        default="",
        metadata={"help": "socks5://, socks4:// or http:// proxy for the websocket and HTTP calls"},
    )
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
        validator=_positive,
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
        validator=_positive,
        metadata={
            "help": "reconnect when no frame (not even a pong) arrived for this long; keep it "
            "above the ping interval (120 s unless Feishu says otherwise)"
        },
    )
    request_timeout: float = attrs.field(
        default=10.0, validator=_positive, metadata={"help": "seconds for one OpenAPI call"}
    )
    degrade_after: int = attrs.field(
        default=3,
        validator=attrs.validators.ge(1),
        metadata={"help": "card failures in a row after which answers go out as messages"},
    )
    degrade_for: float = attrs.field(
        default=300.0,
        validator=attrs.validators.ge(0),
        metadata={"help": "seconds to stay on messages before trying cards again"},
    )

    def __attrs_post_init__(self) -> None:
        if self.domain not in DOMAINS and not self.domain.startswith(("http://", "https://")):
            raise ValueError("domain must be 'feishu', 'lark' or an http:// or https:// URL")
        if self.proxy and not self.proxy.startswith(("socks5://", "socks4://", "http://")):
            raise ValueError("proxy must start with socks5://, socks4:// or http://")

    @property
    def base_url(self) -> str:
        """The OpenAPI and long-connection endpoint base, without a trailing slash."""
        return DOMAINS.get(self.domain, self.domain).rstrip("/")
