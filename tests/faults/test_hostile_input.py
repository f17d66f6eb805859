"""Hostile input: property-based payloads and frames pushed through the platform.

Payloads: starting from a valid payload of the platform (``sample_payload``), hypothesis deletes
keys, puts junk of any type where values were (huge text, lone surrogates, NaN, deep nesting...),
adds junk keys; or it pushes something that is no payload at all (other JSON values, non-JSON text,
bytes that are not UTF-8).  The platform frames it as it frames a message.  Whatever arrives, the
gateway must acknowledge the frame (a redelivery would be just as bad), either take it as a message
or log why not, never crash, keep its connection, and answer the next normal message.

Frames: the same mutations one level down, on the fields of a valid frame (``sample_frame``: frame
type, headers, ids, topics, methods, part counts, the payload's place), with the platform's own
words (``frame_vocabulary``) among the junk, or no frame at all; and payloads split in parts, in
any order, with parts lost, repeated or lying about their place.  The gateway must ACK each frame
the platform waits an ACK for, take it or log it, never crash, and answer the next normal message
once, on its connection or, when the frame ended it, on a new one.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from gateway.runtime import Gateway
from gateway_testkit.harness import FaultInjection, FramePush

from ._support import ONCE, Start, assert_answered_once

#: a fixed answer: hostile questions must not make the reply path itself huge
AGENT = {"type": "scripted", "chunks": ["fine, ", "thanks"]}
ANSWER = "fine, thanks"
NORMAL = "normal-"  # the id prefix of the normal message sent after each hostile one

HYPOTHESIS = settings(
    max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "60")),
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


#: bigger than the 4 MiB a websocket client accepts by default: the connection may end
OVERSIZED = 5 * 2**20


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
def mutated(
    draw: st.DrawFn, sample: dict[str, Any], values: st.SearchStrategy[Any] = REPLACEMENT
) -> dict[str, Any]:
    """``sample`` with one to four keys deleted, replaced by one of ``values`` or added."""
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
                target[draw(TEXT)] = draw(values)
        elif action == "delete":
            del holder[last]
        else:
            holder[last] = draw(values)
    return payload


def hostile_frames(harness: FaultInjection) -> st.SearchStrategy[Any]:
    """A valid frame of the platform with fields deleted, added or replaced by junk or by words
    of the protocol, or no frame at all."""
    sample = harness.sample_frame("hello", message_id=f"hostile-{uuid.uuid4().hex}", sender="bad")
    words = st.sampled_from(harness.frame_vocabulary())
    # Words of the protocol as often as junk: they are where the driver's logic is.
    return mostly(mutated(sample, words | words | REPLACEMENT), NOT_A_PAYLOAD)


def mostly(usual: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``usual`` three times in four, else ``other``.  (``usual | other`` would draw from each
    branch of ``other``, itself a ``|`` of several, as often as from ``usual``.)"""
    return st.integers(0, 3).flatmap(lambda n: usual if n else other)


def stored(gateway: Gateway, instance: str) -> float:
    """Messages the core took from the driver (new or duplicate)."""
    return sum(
        gateway.metrics.registry.get_sample_value(
            "gateway_messages_total", {"instance": instance, "outcome": outcome}
        )
        or 0.0
        for outcome in ("received", "duplicate")
    )


async def acked(push: FramePush, timeout: float = 3.0) -> bool:
    """Whether the platform got the ACK of ``push`` (waiting up to ``timeout`` s for it)."""
    deadline = time.monotonic() + timeout
    while push.ack is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return push.ack is not None


Survives = Callable[..., Awaitable[None]]


@pytest.fixture
async def survives(
    start: Start, harness: FaultInjection, gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> Survives:
    """``await survives(push, frames=...)``: run ``push()`` (it pushes hostile input to a running
    gateway and returns the frames it pushed, to be ACKed if they expect it) and check that the
    gateway survived.  ``frames``: a frame may end the connection (a goodbye, a frame too big for
    the client), and the gateway must then be back; else it must keep its connection."""
    caplog.set_level(logging.DEBUG)
    runtime = await start(AGENT)

    async def check(
        push: Callable[[], Awaitable[Sequence[FramePush]]],
        *,
        frames: bool = False,
        traced: bool = True,
    ) -> None:
        reconnects = runtime.status.reconnects
        before = stored(gateway, harness.instance)
        caplog.clear()
        pushes = await push()
        # A normal message right after: answered (``send`` waits for a connection, if the frame
        # ended the one there was).
        message_id = f"{NORMAL}{uuid.uuid4().hex}"
        await harness.send("are you still there?", sender="steady", message_id=message_id)
        view = await harness.wait_reply(message_id, timeout=10)
        assert (view.state, view.text) == ("final", ANSWER)
        assert harness.reply_record(message_id) == ONCE
        # Frames are read in order, so an ACK is due by now; a moment for the socket anyway.
        for frame in pushes:
            if frame.expects_ack:
                assert await acked(frame), f"a frame the platform waits an ACK for: {frame}"
        if traced:
            taken = stored(gateway, harness.instance) > before
            # Logged at any level: a payload may be valid yet not for the gateway (a group
            # message that does not mention the bot), which a driver rightly notes at debug level
            # only.  The answer to the previous normal message may still be logging: no trace of
            # this one.
            logged = [
                r for r in caplog.records if not getattr(r, "message_id", "").startswith(NORMAL)
            ]
            assert taken or logged, f"neither taken as a message nor logged: {pushes}"
        # The gateway's own errors and unhandled task exceptions (asyncio logs those when the task
        # is collected: now); the emulator's server may log its own (refusing a request line of
        # 100 kB, as the platform would).
        gc.collect()
        crashes = [
            r
            for r in caplog.records
            if r.levelno >= logging.ERROR
            and r.exc_info
            and r.name.startswith(("gateway", "asyncio"))
        ]
        assert not crashes, [r.getMessage() for r in crashes]
        if frames and runtime.status.reconnects != reconnects:
            if currently_in_test_context():  # --hypothesis-show-statistics counts them
                event("the frame ended the connection")
        else:
            assert runtime.status.reconnects == reconnects
        assert harness.connections() == 1

    return check


# -- payloads ------------------------------------------------------------------------------------


def payload_push(harness: FaultInjection, payload: Any) -> Callable[[], Awaitable[list[FramePush]]]:
    async def push() -> list[FramePush]:
        assert await harness.push_raw(payload, timeout=3), "the frame was not acknowledged"
        return []

    return push


@HYPOTHESIS
@given(data=st.data())
async def test_hostile_payloads_are_acknowledged_logged_and_survived(
    data: st.DataObject, harness: FaultInjection, survives: Survives
) -> None:
    sample = harness.sample_payload("hello", message_id=f"hostile-{uuid.uuid4().hex}", sender="bad")
    payload = data.draw(mostly(mutated(sample), NOT_A_PAYLOAD), label="payload")
    await survives(payload_push(harness, payload))


@pytest.mark.parametrize(
    "payload",
    [
        "[" * 3000 + "]" * 3000,  # once made the parser raise RecursionError: never ACKed
        b"\xff\xfe not UTF-8 \xc3",
    ],
    ids=["nested-3000-deep", "not-utf-8"],
)
async def test_known_hostile_payloads_are_survived(
    payload: Any, harness: FaultInjection, survives: Survives
) -> None:
    await survives(payload_push(harness, payload))


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


# -- frames --------------------------------------------------------------------------------------


@HYPOTHESIS
@given(data=st.data())
async def test_hostile_frames_are_acknowledged_logged_and_survived(
    data: st.DataObject, harness: FaultInjection, survives: Survives
) -> None:
    frame = data.draw(hostile_frames(harness), label="frame")

    async def push() -> list[FramePush]:
        pushed = await harness.push_frame(frame)
        event(f"an ACK expected: {pushed.expects_ack}")  # --hypothesis-show-statistics
        return [pushed]

    await survives(push, frames=True)


def with_biggest_value(frame: dict[str, Any], value: Any) -> dict[str, Any]:
    """``frame`` with its longest text (the payload, on every platform) replaced by ``value``."""
    path = max(
        (p for p in key_paths(frame) if isinstance(_at(frame, p), str | bytes)),
        key=lambda p: len(_at(frame, p)),
    )
    changed = copy.deepcopy(frame)
    *parents, last = path
    _at(changed, parents)[last] = value
    return changed


def _at(value: Any, path: Sequence[Any]) -> Any:
    for key in path:
        value = value[key]
    return value


@pytest.mark.parametrize(
    "make",
    [
        lambda frame: with_biggest_value(frame, "x" * 3_000_000),  # below the client's limit
        lambda frame: with_biggest_value(frame, "x" * OVERSIZED),  # beyond the client's limit
        lambda frame: with_biggest_value(frame, "[" * 3000 + "]" * 3000),
        lambda frame: with_biggest_value(frame, {"not": "a string"}),
        lambda frame: {**frame, "headers": "not headers"},
        lambda frame: "{" * 3000 + "}" * 3000,
        lambda frame: b"\x0a\xff\xff\xff\xff\x0f",  # a length far beyond the bytes there are
    ],
    ids=[
        "3-MB",
        "5-MiB",
        "nested-payload",
        "payload-not-text",
        "headers-not-a-table",
        "nested",
        "truncated",
    ],
)
async def test_known_hostile_frames_are_survived(
    make: Callable[[dict[str, Any]], Any], harness: FaultInjection, survives: Survives
) -> None:
    sample = harness.sample_frame("hello", message_id=f"known-{uuid.uuid4().hex}", sender="bad")
    frame = make(sample)

    async def push() -> list[FramePush]:
        return [await harness.push_frame(frame)]

    await survives(push, frames=True)


def _headers(frame: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**frame, "headers": {**frame["headers"], **changes}}


def _without(frame: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if k != key}


#: frames of one platform each, named, at the edges of its protocol
PLATFORM_FRAMES: dict[str, dict[str, Callable[[dict[str, Any]], Any]]] = {
    "dingtalk-stream": {
        "time-infinite": lambda f: _headers(f, time=math.inf),
        "time-huge": lambda f: _headers(f, time=10**400),
        "time-nan": lambda f: _headers(f, time=math.nan),
        "ping-data-not-json": lambda f: _headers(
            {**f, "type": "SYSTEM", "data": "{"}, topic="ping"
        ),
        "ping-data-list": lambda f: _headers({**f, "type": "SYSTEM", "data": "[1]"}, topic="ping"),
        "event-without-data": lambda f: _without({**f, "type": "EVENT"}, "data"),
        "without-type": lambda f: _without(f, "type"),
        "type-null": lambda f: {**f, "type": None},
    },
    "feishu": {
        "header-not-utf-8": lambda f: _headers(f, trace_id=b"\xff\xfe"),
        "id-not-utf-8": lambda f: _headers(f, message_id=b"\xff"),
        "sum-huge": lambda f: _headers(f, sum=str(2**63), seq="0"),
        "seq-negative": lambda f: _headers(f, sum="2", seq="-1"),
        "method-unknown": lambda f: {**f, "method": 7},
        "control-with-an-event": lambda f: {**f, "method": 0},
        "pong-tiny-ping-interval": lambda f: {
            **f,
            "method": 0,
            "headers": {"type": "pong"},
            "payload": '{"PingInterval": 1e-300}',
        },
        "without-method": lambda f: _without(f, "method"),
        "method-not-a-number": lambda f: {**f, "method": "1"},
    },
}


@pytest.mark.parametrize(
    ("harness", "name"),
    [
        pytest.param(platform, name, id=f"{platform}-{name}")
        for platform, frames in sorted(PLATFORM_FRAMES.items())
        for name in frames
    ],
    indirect=["harness"],
)
async def test_known_frames_of_each_platform_are_survived(
    name: str, harness: FaultInjection, survives: Survives
) -> None:
    sample = harness.sample_frame("hello", message_id=f"known-{uuid.uuid4().hex}", sender="bad")
    frame = PLATFORM_FRAMES[harness.driver_type][name](sample)

    async def push() -> list[FramePush]:
        return [await harness.push_frame(frame)]

    await survives(push, frames=True)


@pytest.fixture
def splits(harness: FaultInjection) -> FaultInjection:
    """The harness, if its platform splits payloads over frames."""
    probe = harness.sample_frame("probe", message_id=f"probe-{uuid.uuid4().hex}")
    if harness.split_frame(probe, 2) is None:
        pytest.skip(f"{harness.driver_type} does not split payloads over frames")
    return harness


#: how a part may lie: about how many parts there are, which one it is, whose part it is
CORRUPTIONS = ("drop", "repeat", "sum", "seq", "id")


@HYPOTHESIS
@given(data=st.data())
async def test_payloads_in_parts_are_put_together_or_dropped_never_half_answered(
    data: st.DataObject, splits: FaultInjection, survives: Survives
) -> None:
    """A payload in 2-4 parts, pushed in any order, some parts lost, repeated, or lying in their
    headers.  All parts there once (repeats allowed): the message is answered once and ACKed;
    otherwise it is answered at most once, and nothing crashes."""
    harness = splits
    message_id = f"parts-{uuid.uuid4().hex}"
    sample = harness.sample_frame("hello", message_id=message_id, sender="parts")
    count = data.draw(st.integers(2, 4), label="parts")
    parts = harness.split_frame(sample, count)
    assert parts is not None
    order = [copy.deepcopy(parts[i]) for i in data.draw(st.permutations(range(count)))]
    corruptions = data.draw(st.lists(st.sampled_from(CORRUPTIONS), max_size=2), label="lies")
    words = st.sampled_from(harness.frame_vocabulary()) | TEXT
    for corruption in corruptions:
        i = data.draw(st.integers(0, len(order) - 1))
        headers = order[i]["headers"]
        match corruption:
            case "drop":
                del order[i]
            case "repeat":
                order.insert(data.draw(st.integers(0, len(order))), copy.deepcopy(order[i]))
            case "sum" | "seq":
                was = headers[corruption]
                headers[corruption] = data.draw(words.filter(lambda w, was=was: w != was))
            case "id":
                headers["message_id"] = uuid.uuid4().hex
        if not order:
            break
    whole = set(corruptions) <= {"repeat"}
    pushed: list[FramePush] = []

    async def push() -> list[FramePush]:
        pushed.extend([await harness.push_frame(part) for part in order])
        return pushed

    # Not traced: parts waiting for the others are neither a message nor worth a log line yet.
    await survives(push, frames=True, traced=False)
    if whole:
        view = await harness.wait_reply(message_id, timeout=10)
        assert (view.state, view.text) == ("final", ANSWER)
        assert harness.reply_record(message_id) == ONCE
        # The ACK of the whole payload names the frame id every part carries: the harness
        # matches it to the first part pushed.
        assert await acked(pushed[0]), f"the payload in parts was not ACKed: {pushed}"
    else:
        record = harness.reply_record(message_id)
        assert record.replies <= 1, record
