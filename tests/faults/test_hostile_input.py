"""Hostile input: property-based payloads pushed through the platform as it frames messages.

Starting from a valid payload of the platform (``sample_payload``), hypothesis deletes keys, puts
junk of any type where values were (huge text, lone surrogates, NaN, deep nesting...), adds junk
keys; or it pushes something that is no payload at all (other JSON values, non-JSON text, bytes
that are not UTF-8).  Whatever arrives, the gateway must acknowledge the frame (a redelivery would
be just as bad), either take it as a message or log why not, never crash, keep its connection, and
answer the next normal message.
"""

from __future__ import annotations

import copy
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.runtime import Gateway
from gateway_testkit.harness import FaultInjection

from ._support import ONCE, Start, assert_answered_once

#: a fixed answer: hostile questions must not make the reply path itself huge
AGENT = {"type": "scripted", "chunks": ["fine, ", "thanks"]}
ANSWER = "fine, thanks"
NORMAL = "normal-"  # the id prefix of the normal message sent after each hostile one

HYPOTHESIS = settings(
    max_examples=60,
    deadline=None,
    database=None,  # failures print their example; nothing is written into the checkout
    # One gateway serves every example (starting one per example would take minutes).
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Text of any code point, lone surrogates included (hypothesis leaves them out by default).
TEXT = st.text(st.characters(exclude_categories=()), max_size=40)
# Huge text only where a value is replaced (never in every leaf): each is at most 600 kB on the
# wire, so a frame stays well below the 4 MiB a websocket client accepts by default.  DingTalk's
# driver drops its connection on a bigger frame (reported; no platform sends one).
HUGE = st.integers(10_000, 100_000).map(lambda n: "长" * n)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, min_size=1, max_size=4)
        | st.dictionaries(TEXT, inner, min_size=1, max_size=4)
    ),
    max_leaves=12,
)
#: what replaces a value of a valid payload
REPLACEMENT = JUNK | HUGE
#: no payload at all: other JSON values, text that is not JSON, bytes that are not UTF-8
NOT_A_PAYLOAD = (
    JUNK
    | HUGE
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
    | st.binary(max_size=200)
    | st.integers(50, 5_000).map(lambda depth: "[" * depth + "]" * depth)
)


def key_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside nested dicts and lists."""
    paths: list[tuple[Any, ...]] = []
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, child in items:
        paths.append((*prefix, key))
        paths.extend(key_paths(child, (*prefix, key)))
    return paths


@st.composite
def mutated(draw: st.DrawFn, sample: dict[str, Any]) -> dict[str, Any]:
    """``sample`` with one to four keys deleted, replaced by junk or added."""
    payload = copy.deepcopy(sample)
    for _ in range(draw(st.integers(1, 4))):
        paths = key_paths(payload)
        path = draw(st.sampled_from(paths)) if paths else ()
        *parents, last = path or ("",)
        holder: Any = payload
        for key in parents:
            holder = holder[key]
        action = draw(st.sampled_from(["delete", "replace", "add"]))
        if not path or action == "add":
            target = holder[last] if path and isinstance(holder[last], dict) else holder
            if isinstance(target, dict):
                target[draw(TEXT)] = draw(REPLACEMENT)
        elif action == "delete":
            del holder[last]
        else:
            holder[last] = draw(REPLACEMENT)
    return payload


def stored(gateway: Gateway, instance: str) -> float:
    """Messages the core took from the driver (new or duplicate)."""
    return sum(
        gateway.metrics.registry.get_sample_value(
            "gateway_messages_total", {"instance": instance, "outcome": outcome}
        )
        or 0.0
        for outcome in ("received", "duplicate")
    )


Survives = Callable[[Any], Awaitable[None]]


@pytest.fixture
async def survives(
    start: Start, harness: FaultInjection, gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> Survives:
    """``await survives(payload)``: push it to a running gateway and check that it survived."""
    caplog.set_level(logging.DEBUG)
    runtime = await start(AGENT)

    async def check(payload: Any) -> None:
        reconnects = runtime.status.reconnects
        before = stored(gateway, harness.instance)
        caplog.clear()
        assert await harness.push_raw(payload, timeout=3), "the frame was not acknowledged"
        taken = stored(gateway, harness.instance) > before
        # Logged at any level: a payload may be valid yet not for the gateway (a group message
        # that does not mention the bot), which a driver rightly notes at debug level only.  The
        # answer to the previous normal message may still be logging: no trace of this one.
        logged = [r for r in caplog.records if not getattr(r, "message_id", "").startswith(NORMAL)]
        assert taken or logged, "a frame neither taken as a message nor logged"
        # A normal message right after: answered, on the same connection.
        message_id = f"{NORMAL}{uuid.uuid4().hex}"
        await harness.send("are you still there?", sender="steady", message_id=message_id)
        view = await harness.wait_reply(message_id, timeout=10)
        assert (view.state, view.text) == ("final", ANSWER)
        assert harness.reply_record(message_id) == ONCE
        # The gateway's own errors and unhandled task exceptions; the emulator's server may log
        # its own (refusing a request line of 100 kB, as the platform would).
        crashes = [
            r
            for r in caplog.records
            if r.levelno >= logging.ERROR
            and r.exc_info
            and r.name.startswith(("gateway", "asyncio"))
        ]
        assert not crashes, [r.getMessage() for r in crashes]
        assert runtime.status.reconnects == reconnects and harness.connections() == 1

    return check


@HYPOTHESIS
@given(data=st.data())
async def test_hostile_frames_are_acknowledged_logged_and_survived(
    data: st.DataObject, harness: FaultInjection, survives: Survives
) -> None:
    sample = harness.sample_payload("hello", message_id=f"hostile-{uuid.uuid4().hex}", sender="bad")
    await survives(data.draw(mutated(sample) | NOT_A_PAYLOAD, label="payload"))


@pytest.mark.parametrize(
    "payload",
    [
        "[" * 3000 + "]" * 3000,  # once made the parser raise RecursionError: never ACKed
        b"\xff\xfe not UTF-8 \xc3",
    ],
    ids=["nested-3000-deep", "not-utf-8"],
)
async def test_known_hostile_frames_are_survived(payload: Any, survives: Survives) -> None:
    await survives(payload)


async def test_half_an_emoji_is_answered_not_redelivered_forever(
    start: Start, harness: FaultInjection
) -> None:
    """A lone surrogate (an emoji cut in half, ``\\ud83d`` in the JSON) once made the inbox
    refuse the message: never acknowledged, delivered again and again.  It is answered, the
    half character shown as U+FFFD."""
    await start()
    payload = harness.sample_payload("cut here \ud83d", message_id="half-emoji", sender="emoji")
    assert await harness.push_raw(payload)
    await assert_answered_once(harness, {"half-emoji": "cut here \ufffd"})
