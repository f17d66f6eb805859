"""Tests for gateway.access: policies, globs, mentions, the rate limit and input limits."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pytest

from gateway.access import AccessControl, AllowAll
from gateway.config.instance import AccessSettings
from gateway.errors import AccessDenied
from gateway.models import Incoming

DENIED = "Sorry, you are not allowed to use this bot."
_ids = itertools.count()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def msg(
    sender: str = "alice",
    conversation: str = "c1",
    *,
    group: bool = False,
    text: str = "hello",
    raw: dict[str, Any] | None = None,
) -> Incoming:
    return Incoming.create(
        instance="bot",
        message_id=f"m{next(_ids)}",
        conversation_id=conversation,
        sender_id=sender,
        text=text,
        conversation_kind="group" if group else "single",
        raw=raw,
    )


def control(clock: FakeClock | None = None, **settings: Any) -> AccessControl:
    if clock is None:
        return AccessControl.from_settings(AccessSettings(**settings))
    return AccessControl.from_settings(AccessSettings(**settings), clock=clock)


async def refused(ac: AccessControl, message: Incoming) -> str:
    with pytest.raises(AccessDenied) as info:
        await ac.check(message)
    return str(info.value)


async def test_allow_all_returns_message_unchanged() -> None:
    m = msg(text="x" * 10_000)
    assert await AllowAll().check(m) is m


async def test_defaults_allow_everything() -> None:
    ac = control()
    for m in (msg(), msg(group=True)):
        assert await ac.check(m) is m
    assert ac.denied == 0


# -- deny lists ------------------------------------------------------------------------------------


async def test_users_deny_glob() -> None:
    ac = control(users_deny=["spam*"])
    assert await refused(ac, msg("spammer")) == DENIED
    assert await refused(ac, msg("spammer", group=True)) == DENIED
    assert await ac.check(msg("alice"))
    assert ac.denied == 2


async def test_globs_are_case_sensitive_and_support_classes() -> None:
    ac = control(users_deny=["user-[0-9]", "Bob"])
    assert await refused(ac, msg("user-7")) == DENIED
    assert await refused(ac, msg("Bob")) == DENIED
    await ac.check(msg("bob"))
    await ac.check(msg("user-x"))


async def test_conversations_deny_glob() -> None:
    ac = control(conversations_deny=["cid-bad-*"])
    assert await refused(ac, msg(conversation="cid-bad-1", group=True)) == DENIED
    assert await refused(ac, msg(conversation="cid-bad-2")) == DENIED
    await ac.check(msg(conversation="cid-good", group=True))


async def test_deny_beats_allow_and_admin() -> None:
    ac = control(
        single="allowlist",
        group="allowlist",
        users_allow=["eve"],
        conversations_allow=["*"],
        users_deny=["eve"],
        conversations_deny=["blocked"],
        admins=["eve", "root"],
    )
    assert await refused(ac, msg("eve")) == DENIED
    assert await refused(ac, msg("eve", group=True)) == DENIED
    assert await refused(ac, msg("root", "blocked", group=True)) == DENIED
    assert await refused(ac, msg("root", "blocked")) == DENIED


async def test_custom_and_silent_denied_reply() -> None:
    assert await refused(control(users_deny=["*"], denied_reply="No."), msg()) == "No."
    assert await refused(control(users_deny=["*"], denied_reply=""), msg()) == ""


# -- single chats ------------------------------------------------------------------------------------


async def test_single_disabled() -> None:
    ac = control(single="disabled", admins=["root"])
    assert await refused(ac, msg("alice")) == DENIED
    assert await refused(ac, msg("root")) == DENIED  # only allow lists are bypassed by admins
    await ac.check(msg("alice", group=True))


async def test_single_allowlist() -> None:
    ac = control(single="allowlist", users_allow=["staff-*"])
    await ac.check(msg("staff-1"))
    assert await refused(ac, msg("guest")) == DENIED
    # the single policy does not apply to groups
    await ac.check(msg("guest", group=True))


async def test_single_allowlist_empty_refuses_everyone_but_admins() -> None:
    ac = control(single="allowlist", admins=["root"])
    assert await refused(ac, msg("alice")) == DENIED
    await ac.check(msg("root"))


# -- group chats -------------------------------------------------------------------------------------


async def test_group_disabled() -> None:
    ac = control(group="disabled")
    assert await refused(ac, msg(group=True)) == DENIED
    await ac.check(msg())


async def test_group_allowlist_by_conversation() -> None:
    ac = control(group="allowlist", conversations_allow=["team-*"], users_allow=["alice"])
    await ac.check(msg("bob", "team-a", group=True))
    # a sender on users_allow is not enough in a group
    assert await refused(ac, msg("alice", "other", group=True)) == DENIED
    # the group policy does not apply to single chats
    await ac.check(msg("bob", "other"))


async def test_admin_bypasses_group_allowlist() -> None:
    ac = control(group="allowlist", admins=["ro*"])
    await ac.check(msg("root", "anywhere", group=True))
    assert await refused(ac, msg("alice", "anywhere", group=True)) == DENIED


async def test_is_admin() -> None:
    ac = control(admins=["admin-*", "root"])
    assert ac.is_admin(msg("admin-1"))
    assert ac.is_admin(msg("root", group=True))
    assert not ac.is_admin(msg("Root"))
    assert not control().is_admin(msg("root"))


# -- require_mention ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "allowed"),
    [
        ({"isInAtList": True}, True),
        ({"isInAtList": False}, False),
        ({}, True),  # the platform does not say: allowed
        (None, True),
    ],
)
async def test_require_mention(raw: dict[str, Any] | None, allowed: bool) -> None:
    ac = control(require_mention=True)
    m = msg(group=True, raw=raw)
    if allowed:
        assert await ac.check(m) is m
    else:
        assert await refused(ac, m) == ""  # silently
        assert ac.denied == 1


async def test_require_mention_only_in_groups_and_only_when_enabled() -> None:
    await control(require_mention=True).check(msg(raw={"isInAtList": False}))
    await control().check(msg(group=True, raw={"isInAtList": False}))


async def test_require_mention_applies_to_admins() -> None:
    ac = control(require_mention=True, admins=["root"])
    assert await refused(ac, msg("root", group=True, raw={"isInAtList": False})) == ""


# -- rate limit --------------------------------------------------------------------------------------

RATE = "You are sending messages too quickly; please wait a moment."


async def test_rate_limit_sliding_window() -> None:
    clock = FakeClock()
    ac = control(clock, rate_limit=2, rate_window=10)
    await ac.check(msg())  # t=1000
    clock.now += 4
    await ac.check(msg())  # t=1004
    clock.now += 1
    assert await refused(ac, msg()) == RATE  # t=1005: 2 in the window
    await ac.check(msg("bob"))  # per sender
    clock.now = 1010.0  # the first message leaves the window
    await ac.check(msg())
    assert await refused(ac, msg()) == RATE
    clock.now = 1014.0  # the second leaves
    await ac.check(msg())
    assert ac.denied == 2


async def test_refused_messages_do_not_count() -> None:
    clock = FakeClock()
    ac = control(clock, rate_limit=1, rate_window=10)
    await ac.check(msg())  # t=1000
    for step in range(1, 10):
        clock.now = 1000.0 + step
        assert await refused(ac, msg()) == RATE
    clock.now = 1010.0  # only the admitted message at 1000 counted
    await ac.check(msg())


async def test_messages_refused_earlier_do_not_count() -> None:
    clock = FakeClock()
    ac = control(clock, rate_limit=1, users_deny=["bad"], single="allowlist", users_allow=["a*"])
    assert await refused(ac, msg("bad")) == DENIED
    assert await refused(ac, msg("bob")) == DENIED
    assert ac.tracked_senders == 0
    await ac.check(msg("alice"))


async def test_admin_is_not_rate_limited() -> None:
    clock = FakeClock()
    ac = control(clock, rate_limit=1, admins=["root"])
    for _ in range(50):
        await ac.check(msg("root"))
    assert ac.tracked_senders == 0


async def test_custom_rate_reply() -> None:
    ac = control(FakeClock(), rate_limit=1, rate_reply="Slow down.")
    await ac.check(msg())
    assert await refused(ac, msg()) == "Slow down."


async def test_rate_limit_zero_means_unlimited() -> None:
    ac = control(FakeClock())
    for _ in range(100):
        await ac.check(msg())
    assert ac.tracked_senders == 0


async def test_rate_limiter_forgets_idle_senders() -> None:
    clock = FakeClock()
    ac = control(clock, rate_limit=3, rate_window=10)
    for i in range(100):
        await ac.check(msg(f"user{i}"))
    assert ac.tracked_senders == 100
    clock.now += 5
    await ac.check(msg("late"))
    assert ac.tracked_senders == 101
    clock.now += 5  # the first 100 windows are now empty
    await ac.check(msg("later"))
    assert ac.tracked_senders == 2
    clock.now += 100
    await ac.check(msg("last"))
    assert ac.tracked_senders == 1


async def test_rate_limiter_table_is_capped() -> None:
    clock = FakeClock()
    ac = control(clock, rate_limit=1, rate_window=1000)
    ac.max_senders = 10
    for i in range(25):
        clock.now += 1
        await ac.check(msg(f"user{i}"))
    assert ac.tracked_senders == 10
    # the oldest were dropped, so they may talk again; the newest are still limited
    await ac.check(msg("user0"))
    assert await refused(ac, msg("user24")) == RATE


# -- input limits ------------------------------------------------------------------------------------


async def test_truncate_long_input() -> None:
    ac = control(max_input_chars=5)
    m = msg(text="abcdefghij")
    out = await ac.check(m)
    assert out.text == "abcde\n\n[message shortened to 5 characters]"
    assert out.message_id == m.message_id and out.sender_id == m.sender_id
    assert m.text == "abcdefghij"
    assert ac.denied == 0


async def test_input_at_limit_is_unchanged() -> None:
    ac = control(max_input_chars=5)
    m = msg(text="abcde")
    assert await ac.check(m) is m
    m = msg(text="x" * 1000)
    assert await control().check(m) is m  # 0 = no limit


async def test_refuse_long_input() -> None:
    ac = control(max_input_chars=5, input_overflow="refuse")
    reply = await refused(ac, msg(text="abcdefghij"))
    assert reply == "Your message is too long (at most 5 characters)."
    assert ac.denied == 1
    await ac.check(msg(text="abc"))


async def test_input_limit_applies_to_admins() -> None:
    ac = control(max_input_chars=3, admins=["root"])
    assert (await ac.check(msg("root", text="abcdef"))).text.startswith("abc\n\n[")


# -- logging -----------------------------------------------------------------------------------------


async def test_refusals_logged_at_debug_without_text(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.access")
    secret = "my-secret-message-text"
    clock = FakeClock()
    ac = control(
        clock,
        users_deny=["bad"],
        single="allowlist",
        users_allow=["ok*"],
        require_mention=True,
        rate_limit=1,
        max_input_chars=5,
        input_overflow="refuse",
    )
    await refused(ac, msg("bad", text=secret))
    await refused(ac, msg("stranger", text=secret))
    await refused(ac, msg("anyone", group=True, text=secret, raw={"isInAtList": False}))
    await refused(ac, msg("ok1", text=secret))  # too long
    await ac.check(msg("ok2", text="hi"))
    await refused(ac, msg("ok2", text=secret))  # rate
    assert ac.denied == 5
    records = [r for r in caplog.records if r.name == "gateway.access"]
    assert len(records) == 5
    for record in records:
        assert record.levelno == logging.DEBUG
        assert secret not in record.getMessage()
        assert all(secret not in str(arg) for arg in (record.args or ()))
    assert "stranger" in records[1].getMessage()
    assert "c1" in records[1].getMessage()
