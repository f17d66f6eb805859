"""Validators and fields that more than one driver's ``[settings]`` table declares.

A field lives here when it means the same for every platform (same default, same check, same
help); a field that only looks alike (another default, another platform's quota in its help)
stays with its driver.
"""

from __future__ import annotations

from typing import Any

import attrs

from gateway.proxy import proxy_repr

__all__ = [
    "degrade_after_field",
    "degrade_for_field",
    "feedback_labels_field",
    "feedback_values_field",
    "four_distinct",
    "positive",
    "proxy_field",
    "request_timeout_field",
]

#: ``> 0``, for int and float fields alike (hence ``Any``: attrs types validators per field).
positive: Any = attrs.validators.gt(0)


def four_distinct(
    _instance: object, _attribute: attrs.Attribute[list[str]], value: list[str]
) -> None:
    """Four buttons (feedback labels, their values, their action ids): no more, no fewer, no
    two alike, or clicks could not be told apart."""
    if len(value) != 4 or len(set(value)) != 4:
        raise ValueError("must be four distinct strings")


def proxy_field() -> Any:
    """``proxy``: checked with :func:`gateway.proxy.check_proxy_url` in ``__attrs_post_init__``."""
    return attrs.field(
        default="",
        repr=proxy_repr,  # a password in the URL never shows
        metadata={"help": "socks5://, socks4:// or http:// proxy for the websocket and HTTP calls"},
    )


def feedback_labels_field() -> Any:
    return attrs.field(
        factory=lambda: ["😄 非常有帮助", "😊 有帮助", "🙂 帮助不大", "😅 没帮助"],
        validator=four_distinct,
        metadata={"help": "the four feedback button labels"},
    )


def feedback_values_field() -> Any:
    return attrs.field(
        factory=lambda: ["very_helpful", "helpful", "not_helpful", "unhelpful"],
        validator=four_distinct,
        metadata={"help": "the rating recorded for each button"},
    )


def request_timeout_field() -> Any:
    return attrs.field(
        default=10.0, validator=positive, metadata={"help": "seconds for one OpenAPI call"}
    )


def degrade_after_field(fallback: str) -> Any:
    """``degrade_after`` of the card breaker (:class:`gateway.breaker.Breaker`); ``fallback``
    names what answers go out as meanwhile (e.g. ``"markdown"``)."""
    return attrs.field(
        default=3,
        validator=attrs.validators.ge(1),
        metadata={"help": f"card failures in a row after which answers go out as {fallback}"},
    )


def degrade_for_field(fallback: str) -> Any:
    """``degrade_for``: how long the breaker stays open, in seconds."""
    return attrs.field(
        default=300.0,
        validator=attrs.validators.ge(0),
        metadata={"help": f"seconds to stay on {fallback} before trying cards again"},
    )
