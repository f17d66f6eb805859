"""Reply API faults: expired tokens, the platform's rate limit, server errors, slow answers.  The
final reply still lands for every message, and under the platform's quota the gateway slows down
instead of hammering it (no storm of rejections).

An expired token is the platform invalidating every token it issued (``expire_tokens``): a gateway
that only retries, without fetching a new one, never lands another reply."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway_testkit.harness import API_FAULTS, ApiFault, FaultInjection

from ._support import Start, assert_answered_once, send_all

STREAMING = {"type": "echo", "delay": 0.05}  # a few visible updates per answer: more API calls
QUOTA = 5.0  # the platform's reply API calls per second and app (DingTalk: per API, too)
# A quota the first burst must exceed: every message starts with a card creation, and 12 of them
# within a second are six times 2/s, however slowly the machine runs them.  (A burst of 20 at 5/s
# was rejected once or twice only, as the gateway learns from the first rejection: on a loaded
# machine it could pass under the quota, and the test then proved nothing.)
TIGHT_QUOTA = 2.0
TIGHT_MESSAGES = 12


@pytest.mark.parametrize("fault", API_FAULTS)
async def test_failing_reply_calls_are_retried_until_every_reply_lands(
    start: Start, harness: FaultInjection, fault: ApiFault
) -> None:
    async with asyncio.timeout(40):
        await start(STREAMING)
        # Enough failures to hit creating, streaming and finishing replies of several messages.
        harness.fail_next_api_calls(6, fault)
        if fault == "token_expired":
            harness.expire_tokens()  # and the old token is really gone, not just refused once
        texts = {f"{fault}-{i}": f"answer {i} despite {fault} errors" for i in range(5)}
        await send_all(harness, texts)
        await assert_answered_once(harness, texts, timeout=30)


async def test_tokens_expiring_while_replies_stream_are_renewed(
    start: Start, harness: FaultInjection
) -> None:
    """Every token the gateway holds becomes invalid, before a burst and again while its replies
    stream: only a gateway that fetches a new token (each time) lands them."""
    async with asyncio.timeout(40):
        await start(STREAMING)
        first = {"renew-first": "answered with the first token"}
        await send_all(harness, first)
        await assert_answered_once(harness, first)  # the gateway holds a token now
        harness.expire_tokens()
        texts = {f"renew-{i}": f"answer {i} with a new token and then another" for i in range(5)}
        asking = asyncio.create_task(send_all(harness, texts))
        # Mid-stream: each answer streams for about half a second (nine words, 0.05 s each).
        await asyncio.sleep(0.3)
        harness.expire_tokens()
        await asking
        await assert_answered_once(harness, texts, timeout=30)


async def test_slow_api_answers_delay_replies_but_lose_none(
    start: Start, harness: FaultInjection
) -> None:
    async with asyncio.timeout(40):
        await start(STREAMING)
        harness.set_api_latency(0.4)
        texts = {f"slow-{i}": f"answered over a slow API {i}" for i in range(8)}
        await send_all(harness, texts)
        await assert_answered_once(harness, texts, timeout=30)


async def test_under_the_platform_rate_limit_every_reply_lands_without_a_storm(
    start: Start, harness: FaultInjection, record_property: pytest.RecordProperty
) -> None:
    """The gateway does not know the quota (its own limit is far above it): it learns from the
    rejections, and must back off instead of retrying every reply on its own."""
    harness.set_rate_limit(TIGHT_QUOTA)
    async with asyncio.timeout(60):
        await start(STREAMING)
        texts = {
            f"quota-{i}": f"question number {i} under the quota" for i in range(TIGHT_MESSAGES)
        }
        started = time.monotonic()
        samples: list[tuple[float, int]] = []

        async def sample() -> None:
            while True:
                samples.append((time.monotonic(), harness.rate_limit_rejections()))
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        try:
            await send_all(harness, texts)
            await assert_answered_once(harness, texts, timeout=50)
        finally:
            sampler.cancel()
        rejected = harness.rate_limit_rejections()
    record_property("rate_limit_rejections", rejected)
    record_property("rate_limit_worst_second", max_in_a_second(samples))
    record_property("rate_limited_burst_s", round(time.monotonic() - started, 2))
    assert rejected > 0, "the quota was never reached: the test proves nothing"
    # A gateway retrying each reply on its own would be rejected dozens of times a second for as
    # long as the burst lasts.  Backing off, the drivers were rejected 6-17 times for these 12
    # messages (DingTalk 11-17, Feishu 6-9; the timing varies): twice per message is the bound of
    # "no storm".
    assert rejected <= 2 * len(texts), rejected


async def test_with_the_gateway_limiter_below_the_quota_nothing_is_rejected(
    start: Start, harness: FaultInjection
) -> None:
    harness.set_rate_limit(QUOTA)
    async with asyncio.timeout(40):
        await start(STREAMING, settings=harness.paced_settings(0.8 * QUOTA))
        texts = {f"paced-{i}": f"slow and steady number {i}" for i in range(8)}
        await send_all(harness, texts)
        await assert_answered_once(harness, texts, timeout=30)
        assert harness.rate_limit_rejections() == 0


def max_in_a_second(samples: list[tuple[float, int]]) -> int:
    """The most rejections counted within any one second of the (time, total so far) samples."""
    worst = 0
    for i, (at, total) in enumerate(samples):
        earlier = [count for when, count in samples[: i + 1] if at - when <= 1.0]
        worst = max(worst, total - min(earlier))
    return worst
