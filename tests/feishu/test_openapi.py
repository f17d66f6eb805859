"""The Feishu OpenAPI client against the emulator: which refusals pause the whole app, which only
one call, which are retried and which are final; and that its short-lived credentials are masked.

Each test builds its own client with a fresh app id and its own bucket, so no process-wide state
is shared with other tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from gateway.errors import RetryableError
from gateway.logs import redact
from gateway.ratelimit import CallOutcome, TokenBucket
from gateway.secrets import Secret
from gateway_feishu._openapi import OpenApi, OpenApiError, api_name
from gateway_feishu.emulator import FeishuEmulator
from gateway_feishu.settings import FeishuSettings

Factory = Callable[..., Awaitable[FeishuEmulator]]
SECRET = "fs-openapi-secret-5b1d"
CARDS = "/open-apis/cardkit/v1/cards"
MESSAGES = "/open-apis/im/v1/messages"
RATE = 40.0  # the driver's default app rate


@pytest.fixture
def app() -> str:
    return f"cli_{uuid.uuid4().hex[:16]}"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Client:
    """An :class:`OpenApi` with what it reported: outcomes and log records."""

    def __init__(self, emu: FeishuEmulator, app: str, http: aiohttp.ClientSession) -> None:
        settings = FeishuSettings(app_id=app, app_secret=Secret(SECRET), domain=emu.url)
        #: What the app's bucket made a call wait, in seconds (computed by the bucket, not measured).
        self.waits: list[float] = []
        self.bucket = TokenBucket(RATE, burst=1, sleep=self._wait)
        self.outcomes: list[CallOutcome] = []
        self.log = logging.LoggerAdapter(logging.getLogger("test.feishu.openapi"), {})
        self.api = OpenApi(settings, lambda: http, self.bucket, self.log, self.outcomes.append)

    async def _wait(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(seconds)

    async def card(self) -> str:
        data = {"schema": "2.0", "config": {"streaming_mode": True}, "body": {"elements": []}}
        answer = await self.api.call("POST", CARDS, {"type": "card_json", "data": json.dumps(data)})
        return str(answer["card_id"])

    async def settings(self, card_id: str, sequence: int) -> None:
        body = {
            "settings": json.dumps({"config": {"summary": {"content": "s"}}}),
            "sequence": sequence,
        }
        await self.api.call("PATCH", f"{CARDS}/{card_id}/settings", body)

    async def text(self, chat_id: str, text: str) -> None:
        body = {"receive_id": chat_id, "msg_type": "text", "content": json.dumps({"text": text})}
        await self.api.call("POST", MESSAGES, body, params={"receive_id_type": "chat_id"})


@pytest.fixture
async def client(
    feishu_emulator_factory: Factory, app: str, http: aiohttp.ClientSession
) -> tuple[FeishuEmulator, Client]:
    emu = await feishu_emulator_factory(apps={app: SECRET})
    return emu, Client(emu, app, http)


def test_api_names_leave_the_ids_out() -> None:
    assert api_name("put", f"{CARDS}/7001/elements/answer/content") == (
        "PUT /open-apis/cardkit/v1/cards/:id/elements/:id/content"
    )
    assert api_name("POST", f"{MESSAGES}/om_1/reply") == "POST /open-apis/im/v1/messages/:id/reply"
    assert api_name("POST", CARDS) == "POST /open-apis/cardkit/v1/cards"


async def test_a_per_card_limit_backs_off_that_card_only(
    client: tuple[FeishuEmulator, Client], caplog: pytest.LogCaptureFixture
) -> None:
    emu, c = client
    emu.card_rate_limit = 2
    card_id = await c.card()

    async def burst() -> None:
        for sequence in range(1, 5):  # 4 operations on one card within a second: refusals
            await c.settings(card_id, sequence)

    async with asyncio.timeout(10):
        busy = asyncio.create_task(burst())
        await emu.wait_until(lambda: bool(emu.rejection_log), 3)
        await emu.wait_until(lambda: "rate_limited" in c.outcomes, 3)  # the refusal is handled
        # While that card backs off, the rest of the app goes on: the app is not paused (no wait
        # beyond one token at the app's rate), and this call is not held up behind the card's...
        c.waits.clear()
        await c.card()
        assert not busy.done()
        assert sum(c.waits) <= 1 / RATE
        await busy
        assert emu.cards[card_id].sequence == 4
        assert {r.limit for r in emu.rejection_log} == {"card"}
        # ...and its pace is untouched (one refusal once dropped it to the card's 10/s).
        assert (c.bucket.rate, c.api._api_paces) == (RATE, {})
    assert "rate_limited" in c.outcomes
    assert "pacing" not in caplog.text


async def test_a_per_chat_limit_holds_up_sends_to_that_chat_only(
    client: tuple[FeishuEmulator, Client],
) -> None:
    emu, c = client
    emu.chat_rate_limit = 1
    busy, quiet = emu.add_chat("busy").id, emu.add_chat("quiet").id
    async with asyncio.timeout(10):
        await c.text(busy, "one")
        second = asyncio.create_task(c.text(busy, "two"))  # 230020, then backs off
        await emu.wait_until(lambda: emu.count(MESSAGES, status=400) == 1, 3)
        await emu.wait_until(lambda: "rate_limited" in c.outcomes, 3)  # the refusal is handled
        c.waits.clear()
        await c.text(quiet, "meanwhile")  # another chat: the app is not paused
        assert sum(c.waits) <= 1 / RATE  # at most one token's wait at the app's rate
        await second
    assert [m.text for m in emu.messages] == ["one", "meanwhile", "two"]
    assert c.bucket.rate == RATE


async def test_the_apps_limit_pauses_the_app_and_paces_only_the_api_it_names(
    client: tuple[FeishuEmulator, Client], caplog: pytest.LogCaptureFixture
) -> None:
    emu, c = client
    emu.app_rate_limit = 3  # per app and API, as Feishu counts: x-ogw-ratelimit-limit: 3
    async with asyncio.timeout(15):
        for _ in range(4):
            await c.card()
        assert [r.limit for r in emu.rejection_log] == ["app"]
        name = "POST /open-apis/cardkit/v1/cards"
        assert c.api._api_paces[name].rate == 3  # that API, at the rate Feishu named
        assert c.bucket.rate == RATE  # every other API keeps the app's rate
    assert "pacing that API" in caplog.text


@pytest.mark.parametrize(
    ("code", "retried"),
    [
        (300120, True),  # internal error, retry later (HTTP 400)
        (200810, True),  # the card is in an interaction (HTTP 400)
        (300305, False),  # more than 200 components: no retry makes it fit
        (300315, False),  # failed to add the element
    ],
)
async def test_transient_card_errors_are_retried_and_permanent_ones_are_not(
    client: tuple[FeishuEmulator, Client], code: int, retried: bool
) -> None:
    emu, c = client
    card_id = await c.card()
    emu.fail_next(f"{CARDS}/{card_id}", count=1, http_status=400, code=code, msg="no")
    async with asyncio.timeout(10):
        if retried:
            await c.settings(card_id, 1)
            assert emu.cards[card_id].sequence == 1
            assert c.outcomes[-2:] == ["retried", "ok"]
        else:
            with pytest.raises(OpenApiError) as caught:
                await c.settings(card_id, 1)
            assert caught.value.code == code and not isinstance(caught.value, RetryableError)
            assert c.outcomes[-1] == "failed"
    assert c.bucket.rate == RATE


async def test_the_tenant_token_is_masked_in_logs(client: tuple[FeishuEmulator, Client]) -> None:
    emu, c = client
    await c.card()
    [issued] = [
        call.response["tenant_access_token"]
        for call in emu.calls
        if call.path.endswith("/tenant_access_token/internal")
    ]
    assert issued and issued in await c.api.token()
    failure = f"RetryableError: Feishu {CARDS}: Authorization: Bearer {issued} refused"
    assert issued not in redact(failure) and "Bearer ***" in redact(failure)
