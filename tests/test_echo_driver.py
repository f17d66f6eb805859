"""The echo driver, tested through its real HTTP endpoint (and its terminal, on a pipe or a pty).

A fake context stands in for the core's DriverContext, and a fake core answers every delivered
message through the driver's reply channel, the way ``gateway.pacing`` does.  Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from gateway.driver import ReplyChannel
from gateway.errors import DriverConfigError, ShuttingDown
from gateway.models import FeedbackEvent, Incoming
from gateway_echo import EchoDriver, EchoSettings

TIMEOUT = 5.0

Script = Callable[[ReplyChannel], Coroutine[Any, Any, None]]


class FakeContext:
    """The DriverContext the core would hand the driver; records what the driver reports."""

    def __init__(self, state_dir: Path) -> None:
        self.instance = "echo-test"
        self.logger = logging.LoggerAdapter(logging.getLogger("tests.echo"), {})
        self.state_dir = state_dir
        self.connections = 0
        self.is_connected = asyncio.Event()
        self.frames = 0
        self.messages: list[Incoming] = []
        self.feedbacks: list[FeedbackEvent] = []
        self.shutting_down = False
        self.seen: set[str] = set()  # message ids the "inbox" already has
        self.on_message: Callable[[Incoming], None] = lambda message: None

    def connected(self) -> None:
        self.connections += 1
        self.is_connected.set()

    def frame_received(self) -> None:
        self.frames += 1

    def api_call(self, outcome: str) -> None:
        pass  # the echo driver calls no platform API

    async def deliver(self, message: Incoming) -> bool:
        if self.shutting_down:
            raise ShuttingDown("the gateway is stopping")
        if message.message_id in self.seen:
            return False
        self.seen.add(message.message_id)
        self.messages.append(message)
        self.on_message(message)
        return True

    async def feedback(self, event: FeedbackEvent) -> None:
        self.feedbacks.append(event)


async def answer_hello(channel: ReplyChannel) -> None:
    await channel.start()
    await channel.update("he")
    await channel.update("hello")
    await channel.finish("hello", last=True, feedback=True)


class FakeCore:
    """Answers each delivered message in a task, through the driver's reply channel."""

    def __init__(self, driver: EchoDriver, context: FakeContext, script: Script) -> None:
        self.driver = driver
        self.script = script
        self.tasks: list[asyncio.Task[None]] = []
        context.on_message = self.answer

    def answer(self, message: Incoming) -> None:
        channel = self.driver.open_reply(message)
        self.tasks.append(asyncio.create_task(self.script(channel)))

    async def settle(self) -> None:
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*self.tasks)


class Echo:
    """A running echo driver with its fake core and an HTTP session on its endpoint."""

    def __init__(
        self,
        driver: EchoDriver,
        context: FakeContext,
        core: FakeCore,
        task: asyncio.Task[None],
        http: aiohttp.ClientSession,
    ) -> None:
        self.driver = driver
        self.context = context
        self.core = core
        self.task = task
        self.http = http

    async def post(self, **body: Any) -> list[dict[str, Any]]:
        """Post a message and return every event of its reply stream."""
        async with self.http.post("/messages", json=body) as response:
            assert response.status == 200, await response.text()
            return [event async for event in sse(response)]

    async def transcript(self, message_id: str) -> dict[str, Any]:
        async with self.http.get(f"/messages/{message_id}") as response:
            assert response.status == 200
            result: dict[str, Any] = await response.json()
            return result


@contextlib.asynccontextmanager
async def serving(
    state_dir: Path, settings: EchoSettings | None = None, script: Script = answer_hello
) -> AsyncIterator[Echo]:
    context = FakeContext(state_dir)
    driver = EchoDriver(settings or EchoSettings(terminal="off"), context)
    core = FakeCore(driver, context, script)
    task = asyncio.create_task(driver.serve())
    try:
        await wait_connected(context, task)
        assert driver.url is not None
        timeout = aiohttp.ClientTimeout(total=TIMEOUT)
        async with aiohttp.ClientSession(driver.url, timeout=timeout) as http:
            yield Echo(driver, context, core, task, http)
    finally:
        await asyncio.wait_for(driver.close(), 1.0)
        await asyncio.wait_for(task, 1.0)
        await core.settle()


async def wait_connected(context: FakeContext, task: asyncio.Task[None]) -> None:
    """Until serve() reports connected (again); fails at once if it raised instead."""
    waiter = asyncio.ensure_future(context.is_connected.wait())
    done, _ = await asyncio.wait({waiter, task}, timeout=TIMEOUT, return_when="FIRST_COMPLETED")
    waiter.cancel()
    if task in done:
        task.result()  # raises what serve() raised
        pytest.fail("serve() returned before it connected")
    assert waiter in done, "serve() did not connect in time"
    context.is_connected.clear()  # so that the next wait is for the next connection


@pytest_asyncio.fixture
async def echo(tmp_path: Path) -> AsyncIterator[Echo]:
    async with serving(tmp_path) as running:
        yield running


async def sse(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The events of a text/event-stream response, as they arrive."""
    assert response.content_type == "text/event-stream"
    name = None
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            event = json.loads(line.removeprefix("data: "))
            assert event["event"] == name
            yield event


async def eventually(condition: Callable[[], bool]) -> None:
    """Until ``condition()`` holds: for captured output and logs, which signal nothing."""
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.01)


def gated(gate: asyncio.Event) -> Script:
    """A reply that shows "he", then waits for ``gate`` before it goes on."""

    async def script(channel: ReplyChannel) -> None:
        await channel.start()
        await channel.update("he")
        await gate.wait()
        await channel.update("hello")
        await channel.finish("hello", last=True, feedback=True)

    return script


HELLO_EVENTS = [
    {"event": "thinking"},
    {"event": "update", "index": 0, "text": "he"},
    {"event": "update", "index": 0, "text": "hello"},
    {"event": "part", "index": 0, "text": "hello", "feedback": True},
    {"event": "final", "text": "hello", "parts": 1},
]


# --- messages and their reply streams ------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_message_streams_its_reply_as_server_sent_events(echo: Echo) -> None:
    async with asyncio.timeout(TIMEOUT):
        events = await echo.post(
            text="hi", id="m1", conversation="c1", sender="u1", sender_name="Una", kind="group"
        )
    assert events == HELLO_EVENTS
    [message] = echo.context.messages
    assert message.instance == "echo-test"
    assert (message.message_id, message.conversation_id, message.conversation_kind.value) == (
        "m1",
        "c1",
        "group",
    )
    assert (message.sender_id, message.sender_name, message.text) == ("u1", "Una", "hi")
    assert message.raw["text"] == "hi"
    assert echo.context.frames == 1


@pytest.mark.asyncio
async def test_message_defaults(echo: Echo) -> None:
    async with asyncio.timeout(TIMEOUT):
        await echo.post(text="hi")
    [message] = echo.context.messages
    assert len(message.message_id) == 32  # a uuid4 hex
    assert (message.conversation_id, message.sender_id, message.sender_name) == (
        "default",
        "user",
        "",
    )
    assert message.conversation_kind.value == "single"


@pytest.mark.asyncio
async def test_the_stream_follows_events_as_they_happen(tmp_path: Path) -> None:
    gate = asyncio.Event()
    async with asyncio.timeout(TIMEOUT), serving(tmp_path, script=gated(gate)) as echo:
        async with echo.http.post("/messages", json={"text": "hi", "id": "g1"}) as response:
            events = sse(response)
            assert await anext(events) == {"event": "thinking"}
            assert await anext(events) == {"event": "update", "index": 0, "text": "he"}
            partial = await echo.transcript("g1")
            assert (partial["state"], partial["text"]) == ("streaming", "he")
            gate.set()
            assert [event async for event in events] == HELLO_EVENTS[2:]


@pytest.mark.asyncio
async def test_a_repeated_message_id_gets_a_duplicate_event(echo: Echo) -> None:
    async with asyncio.timeout(TIMEOUT):
        await echo.post(text="hi", id="m1")
        assert await echo.post(text="hi", id="m1") == [{"event": "duplicate", "id": "m1"}]
    assert len(echo.context.messages) == 1
    assert (await echo.transcript("m1"))["state"] == "final"  # the original is untouched


@pytest.mark.asyncio
async def test_a_duplicate_answered_before_a_restart_leaves_no_transcript(echo: Echo) -> None:
    echo.context.seen.add("old")  # in the core's inbox, unknown to this driver object
    async with asyncio.timeout(TIMEOUT):
        assert await echo.post(text="hi", id="old") == [{"event": "duplicate", "id": "old"}]
        async with echo.http.get("/messages/old") as response:
            assert response.status == 404


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"{not json", "JSON"),
        (b"[1, 2]", "object"),
        (b"{}", "'text'"),
        (b'{"text": 5}', "'text'"),
        (b'{"text": "hi", "kind": "channel"}', "'kind'"),
        (b'{"text": "hi", "conversation": 3}', "'conversation'"),
        (b'{"text": "hi", "sender": null}', "'sender'"),
        (b'{"text": "hi", "id": ""}', "'id'"),
    ],
)
@pytest.mark.asyncio
async def test_a_bad_message_is_refused_naming_the_field(
    echo: Echo, body: bytes, named: str
) -> None:
    async with asyncio.timeout(TIMEOUT):
        async with echo.http.post("/messages", data=body) as response:
            assert response.status == 400
            assert named in (await response.json())["error"]
    assert echo.context.messages == []
    assert echo.context.frames == 1


@pytest.mark.asyncio
async def test_every_bad_field_is_named_at_once(echo: Echo) -> None:
    async with asyncio.timeout(TIMEOUT):
        async with echo.http.post("/messages", json={"kind": "x", "sender": 1}) as response:
            error = (await response.json())["error"]
    assert all(name in error for name in ("'text'", "'kind'", "'sender'"))


@pytest.mark.asyncio
async def test_while_shutting_down_a_message_is_refused_with_503(echo: Echo) -> None:
    echo.context.shutting_down = True
    async with asyncio.timeout(TIMEOUT):
        async with echo.http.post("/messages", json={"text": "hi", "id": "s1"}) as response:
            assert response.status == 503
            assert "shutting down" in (await response.json())["error"]
        async with echo.http.get("/messages/s1") as response:
            assert response.status == 404


# --- transcripts -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_get_message_returns_the_transcript(echo: Echo) -> None:
    async with asyncio.timeout(TIMEOUT):
        await echo.post(text="hi", id="m1")
        transcript = await echo.transcript("m1")
        async with echo.http.get("/messages/nope") as response:
            assert response.status == 404
            assert "nope" in (await response.json())["error"]
    assert transcript == {
        "id": "m1",
        "reply_id": echo.context.messages[0].reply_id,
        "state": "final",
        "text": "hello",
        "events": HELLO_EVENTS,
    }


@pytest.mark.asyncio
async def test_events_endpoint_replays_past_events_then_follows(tmp_path: Path) -> None:
    gate = asyncio.Event()
    async with asyncio.timeout(TIMEOUT), serving(tmp_path, script=gated(gate)) as echo:
        async with echo.http.post("/messages", json={"text": "hi", "id": "g1"}) as posted:
            first = sse(posted)
            await anext(first)
            await anext(first)  # "he" is shown; the reply now waits for the gate
            async with echo.http.get("/messages/g1/events") as response:
                late = sse(response)
                assert [await anext(late), await anext(late)] == HELLO_EVENTS[:2]
                gate.set()
                assert [event async for event in late] == HELLO_EVENTS[2:]
        async with echo.http.get("/messages/g1/events") as response:
            assert [event async for event in sse(response)] == HELLO_EVENTS
        async with echo.http.get("/messages/nope/events") as response:
            assert response.status == 404


@pytest.mark.asyncio
async def test_a_resumed_message_is_readable_without_a_waiting_client(echo: Echo) -> None:
    # After a crash the core reopens the reply from its inbox: no HTTP request is waiting for it.
    message = Incoming.create(
        instance="echo-test", message_id="r1", conversation_id="c", sender_id="u", text="hi"
    )
    async with asyncio.timeout(TIMEOUT):
        await answer_hello(echo.driver.open_reply(message))
        transcript = await echo.transcript("r1")
    assert (transcript["state"], transcript["text"]) == ("final", "hello")
    assert transcript["reply_id"] == message.reply_id


@pytest.mark.asyncio
async def test_only_the_last_1000_transcripts_are_kept(echo: Echo) -> None:
    for n in range(1001):
        message = Incoming.create(
            instance="echo-test", message_id=f"n{n}", conversation_id="c", sender_id="u", text=""
        )
        echo.driver.open_reply(message)
    async with asyncio.timeout(TIMEOUT):
        async with echo.http.get("/messages/n0") as response:
            assert response.status == 404
        async with echo.http.get("/messages/n1") as response:
            assert response.status == 200


# --- the reply channel ---------------------------------------------------------------------------


@pytest.mark.parametrize("feedback", [True, False])
@pytest.mark.asyncio
async def test_a_long_answer_shows_its_parts_then_one_final(tmp_path: Path, feedback: bool) -> None:
    # The core finishes every part but the last with last=False; the last gets the instance's
    # feedback setting, which can be off: the end is marked by last=True either way.
    async def three_parts(channel: ReplyChannel) -> None:
        await channel.start()
        await channel.update("aaa")
        await channel.finish("aaa", last=False, feedback=False)
        second = channel.follow_up(1)
        await second.update("b")
        await second.finish("bbb", last=False, feedback=False)
        third = second.follow_up(2)
        await third.finish("ccc", last=True, feedback=feedback)

    async with asyncio.timeout(TIMEOUT), serving(tmp_path, script=three_parts) as echo:
        events = await echo.post(text="long", id="l1")
        transcript = await echo.transcript("l1")
    assert events == [
        {"event": "thinking"},
        {"event": "update", "index": 0, "text": "aaa"},
        {"event": "part", "index": 0, "text": "aaa", "feedback": False},
        {"event": "update", "index": 1, "text": "b"},
        {"event": "part", "index": 1, "text": "bbb", "feedback": False},
        {"event": "part", "index": 2, "text": "ccc", "feedback": feedback},
        {"event": "final", "text": "aaabbbccc", "parts": 3},
    ]
    assert (transcript["state"], transcript["text"]) == ("final", "aaabbbccc")


@pytest.mark.asyncio
async def test_a_failed_reply_ends_with_an_error_event(tmp_path: Path) -> None:
    async def failing(channel: ReplyChannel) -> None:
        await channel.start()
        await channel.update("par")
        await channel.fail("par", "the agent timed out")

    async with asyncio.timeout(TIMEOUT), serving(tmp_path, script=failing) as echo:
        events = await echo.post(text="hi", id="f1")
        transcript = await echo.transcript("f1")
    assert events[-1] == {
        "event": "error",
        "index": 0,
        "text": "par",
        "error": "the agent timed out",
    }
    assert (transcript["state"], transcript["text"]) == ("failed", "par")


@pytest.mark.asyncio
async def test_a_client_that_leaves_does_not_affect_the_reply(tmp_path: Path) -> None:
    gate = asyncio.Event()
    async with asyncio.timeout(TIMEOUT), serving(tmp_path, script=gated(gate)) as echo:
        async with echo.http.post("/messages", json={"text": "hi", "id": "g1"}) as response:
            assert await anext(sse(response)) == {"event": "thinking"}
            response.close()  # drop the connection mid-stream
        gate.set()
        await echo.core.settle()
        assert (await echo.transcript("g1"))["state"] == "final"


# --- feedback --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_feedback_is_recorded_for_the_messages_reply(echo: Echo) -> None:
    async with asyncio.timeout(TIMEOUT):
        await echo.post(text="hi", id="m1")
        body = {"message_id": "m1", "user": "u1", "rating": "helpful", "comment": "nice"}
        async with echo.http.post("/feedback", json=body) as response:
            assert response.status == 204
    [event] = echo.context.feedbacks
    assert event.reply_id == echo.context.messages[0].reply_id
    assert (event.instance, event.user_id, event.rating) == ("echo-test", "u1", "helpful")
    assert (event.message_id, event.comment) == ("m1", "nice")


@pytest.mark.asyncio
async def test_feedback_on_an_unknown_message_or_without_a_rating_is_refused(echo: Echo) -> None:
    async with asyncio.timeout(TIMEOUT):
        unknown = {"message_id": "nope", "user": "u1", "rating": "helpful"}
        async with echo.http.post("/feedback", json=unknown) as response:
            assert response.status == 404
        await echo.post(text="hi", id="m1")
        async with echo.http.post("/feedback", json={"message_id": "m1", "user": "u1"}) as response:
            assert response.status == 400
            assert "'rating'" in (await response.json())["error"]
    assert echo.context.feedbacks == []


# --- serving, closing, failing -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_serve_logs_its_url_and_reports_connected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tests.echo")
    async with asyncio.timeout(TIMEOUT), serving(tmp_path) as echo:
        url = echo.driver.url
        assert url is not None and url.startswith("http://127.0.0.1:")
        assert f"echo listening on {url}" in caplog.messages
        assert echo.context.connections == 1
    assert echo.driver.url is None


@pytest.mark.asyncio
async def test_a_port_in_use_is_a_config_error_and_serve_works_once_it_is_free(
    tmp_path: Path,
) -> None:
    context = FakeContext(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        driver = EchoDriver(EchoSettings(port=port, terminal="off"), context)
        with pytest.raises(DriverConfigError, match=f"127.0.0.1:{port}") as raised:
            await asyncio.wait_for(driver.serve(), TIMEOUT)
    assert isinstance(raised.value.__cause__, OSError)
    assert context.connections == 0
    # The supervisor retries later: the same driver object must serve then.
    task = asyncio.create_task(driver.serve())
    try:
        await wait_connected(context, task)
        assert driver.url == f"http://127.0.0.1:{port}"
    finally:
        await asyncio.wait_for(driver.close(), 1.0)
        await asyncio.wait_for(task, 1.0)


@pytest.mark.asyncio
async def test_close_ends_serve_promptly_even_with_open_streams_and_serve_works_again(
    tmp_path: Path,
) -> None:
    gate = asyncio.Event()
    context = FakeContext(tmp_path)
    driver = EchoDriver(EchoSettings(terminal="off"), context)
    core = FakeCore(driver, context, gated(gate))
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(TIMEOUT), aiohttp.ClientSession() as http:
        task = asyncio.create_task(driver.serve())
        await wait_connected(context, task)
        url = driver.url
        async with http.post(f"{url}/messages", json={"text": "hi", "id": "g1"}) as response:
            events = sse(response)
            await anext(events)
            started = loop.time()
            await asyncio.wait_for(driver.close(), 1.0)
            await asyncio.wait_for(task, 1.0)
            assert loop.time() - started < 1.0
            # The open stream ends (without "final": the reply is not done).
            assert [event async for event in events] == [HELLO_EVENTS[1]]
        await asyncio.wait_for(driver.close(), 1.0)  # idempotent
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"{url}/messages/g1")

        # The reply may still finish after close(): its channel does no I/O.
        gate.set()
        await core.settle()

        task = asyncio.create_task(driver.serve())
        await wait_connected(context, task)
        async with http.get(f"{driver.url}/messages/g1") as response:
            assert (await response.json())["state"] == "final"  # transcripts outlive a serve()
        await asyncio.wait_for(driver.close(), 1.0)
        await asyncio.wait_for(task, 1.0)
    assert context.connections == 2


@pytest.mark.asyncio
async def test_cancelling_serve_closes_the_server(tmp_path: Path) -> None:
    context = FakeContext(tmp_path)
    driver = EchoDriver(EchoSettings(terminal="off"), context)
    async with asyncio.timeout(TIMEOUT), aiohttp.ClientSession() as http:
        task = asyncio.create_task(driver.serve())
        await wait_connected(context, task)
        url = driver.url
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert driver.url is None
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"{url}/messages/x")
        await asyncio.wait_for(driver.close(), 1.0)  # harmless after a cancelled serve()


# --- terminal mode -------------------------------------------------------------------------------


@pytest.fixture
def stdin_pipe(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Replace stdin by a pipe; yields the writing end."""
    read_fd, write_fd = os.pipe()
    stdin = os.fdopen(read_fd, "r")
    writer = os.fdopen(write_fd, "wb", buffering=0)
    monkeypatch.setattr(sys, "stdin", stdin)
    yield writer
    writer.close()
    stdin.close()


@pytest.mark.asyncio
async def test_terminal_mode_is_off_by_default_when_stdin_is_not_a_tty(
    tmp_path: Path, stdin_pipe: Any
) -> None:
    async with asyncio.timeout(TIMEOUT), serving(tmp_path, EchoSettings()) as echo:
        stdin_pipe.write(b"hello there\n")
        await asyncio.sleep(0.2)
        assert echo.context.messages == []


@pytest.mark.asyncio
async def test_terminal_mode_is_on_by_default_when_stdin_is_a_tty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    master, slave = os.openpty()
    with os.fdopen(master, "wb", buffering=0) as keyboard, os.fdopen(slave, "r") as tty:
        monkeypatch.setattr(sys, "stdin", tty)
        async with asyncio.timeout(TIMEOUT), serving(tmp_path, EchoSettings()) as echo:
            keyboard.write(b"hi\n")
            await eventually(lambda: len(echo.context.messages) == 1)
    assert echo.context.messages[0].conversation_id == "terminal"


@pytest.mark.asyncio
async def test_terminal_lines_become_messages_and_replies_are_printed_as_they_grow(
    tmp_path: Path, stdin_pipe: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async def rewriting(channel: ReplyChannel) -> None:
        await channel.start()
        await channel.update("hel")
        await channel.update("hello")
        await channel.update("help")  # not an extension of what is shown: printed again
        await channel.finish("help!", last=True, feedback=True)

    settings = EchoSettings(terminal="on", terminal_sender="alice")
    printed = ""

    def replied() -> bool:
        nonlocal printed
        printed += capsys.readouterr().out
        return printed.endswith("\n") and "help!" in printed

    async with asyncio.timeout(TIMEOUT), serving(tmp_path, settings, rewriting) as echo:
        stdin_pipe.write(b"   \nfirst question\n")  # the blank line is skipped
        await eventually(replied)
    [message] = echo.context.messages
    assert (message.conversation_id, message.sender_id, message.text) == (
        "terminal",
        "alice",
        "first question",
    )
    assert printed.endswith("hello\nhelp!\n")


@pytest.mark.asyncio
async def test_end_of_stdin_stops_only_the_terminal(
    tmp_path: Path, stdin_pipe: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tests.echo")
    async with asyncio.timeout(TIMEOUT), serving(tmp_path, EchoSettings(terminal="on")) as echo:
        stdin_pipe.close()
        await eventually(lambda: any("stdin closed" in m for m in caplog.messages))
        assert not echo.task.done()
        assert await echo.post(text="still there?") == HELLO_EVENTS


@pytest.mark.asyncio
async def test_terminal_on_without_a_usable_stdin_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    regular_file = (tmp_path / "input.txt").open("w+")
    monkeypatch.setattr(sys, "stdin", regular_file)
    driver = EchoDriver(EchoSettings(terminal="on"), FakeContext(tmp_path))
    with regular_file, pytest.raises(DriverConfigError, match="stdin"):
        await asyncio.wait_for(driver.serve(), TIMEOUT)
    assert driver.url is None


# --- settings and packaging ----------------------------------------------------------------------


def test_capabilities_follow_the_settings() -> None:
    driver = EchoDriver(EchoSettings(max_text_length=500), FakeContext(Path(".")))
    capabilities = driver.capabilities
    assert (capabilities.edits, capabilities.streams, capabilities.feedback) == (True, True, True)
    assert capabilities.proactive  # GET /sent shows what it sent
    assert capabilities.max_text_length == 500
    assert driver.url is None


@pytest.mark.parametrize(
    "bad", [{"terminal": "maybe"}, {"max_text_length": 15}, {"port": -1}, {"port": 70000}]
)
def test_invalid_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        EchoSettings(**bad)


def test_settings_document_every_field() -> None:
    import attrs

    assert all(field.metadata.get("help") for field in attrs.fields(EchoSettings))


def test_only_a_fixed_port_is_exclusive() -> None:
    assert EchoDriver.exclusive_key(EchoSettings()) is None
    assert EchoDriver.exclusive_key(EchoSettings(port=8080)) == "127.0.0.1:8080"


def test_the_driver_is_registered_as_an_entry_point() -> None:
    [entry_point] = importlib.metadata.entry_points(group="gateway.drivers", name="echo")
    assert entry_point.load() is EchoDriver
    assert EchoDriver.title == "Echo"
    assert EchoDriver.settings_class is EchoSettings
