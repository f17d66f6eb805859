"""The state database, the durable inbox and the feedback store, on real SQLite files."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from gateway.models import (
    Attachment,
    ConversationKind,
    FeedbackEvent,
    Incoming,
    Mention,
    Outcome,
    Reply,
)
from gateway.store import Database, EntryState, FeedbackStore, Inbox

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0  # bound on every wait for another thread or process


def message(message_id: str = "m1", instance: str = "bot", **changes: object) -> Incoming:
    fields: dict[str, object] = {
        "instance": instance,
        "message_id": message_id,
        "conversation_id": "conv-1",
        "sender_id": "u1",
        "sender_name": "Ada",
        "text": f"question {message_id}",
        "received_at": 1_700_000_000.25,
    }
    fields.update(changes)
    return Incoming.create(**fields)  # type: ignore[arg-type]


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "gateway.sqlite3"


@pytest_asyncio.fixture
async def db(db_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(db_path)
    try:
        yield database
    finally:
        await database.close()


class Gate:
    """Holds the worker thread inside a write, so the jobs queued meanwhile form one batch."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def block(self, conn: sqlite3.Connection) -> None:
        self.entered.set()
        if not self.release.wait(WAIT):
            raise TimeoutError("the gate was never opened")

    async def close_on(self, db: Database) -> asyncio.Task[None]:
        task = asyncio.ensure_future(db.write(self.block))
        assert await asyncio.to_thread(self.entered.wait, WAIT), "the worker never ran the gate"
        return task


# -- the database ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_open_creates_parent_dirs_in_wal_mode(db_path: Path) -> None:
    db = await Database.open(db_path)
    try:
        assert await asyncio.to_thread(db_path.is_file)
        assert await db.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
        # synchronous=FULL is 2: a committed entry survives a power cut.
        assert await db.read(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2
        assert await db.read(lambda c: c.execute("PRAGMA busy_timeout").fetchone()[0]) > 0
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_open_failure_is_raised(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OSError):
        await Database.open(tmp_path / "file" / "gateway.sqlite3")


@pytest.mark.asyncio
async def test_group_commit_batches_queued_writes(db: Database) -> None:
    inbox = Inbox(db)
    gate = Gate()
    blocker = await gate.close_on(db)
    before = db.commits
    adds = [asyncio.ensure_future(inbox.add(message(f"m{i}"))) for i in range(200)]
    await asyncio.sleep(0.05)  # every add is queued behind the gate
    gate.release.set()
    await asyncio.wait_for(blocker, WAIT)
    assert all(await asyncio.wait_for(asyncio.gather(*adds), WAIT))
    # One commit for the gate's batch, one for all 200 adds.
    assert db.commits - before == 2
    assert len(await inbox.pending("bot")) == 200


@pytest.mark.asyncio
async def test_concurrent_writes_share_commits(db: Database) -> None:
    inbox = Inbox(db)
    before_commits, before_writes = db.commits, db.writes
    results = await asyncio.wait_for(
        asyncio.gather(*(inbox.add(message(f"m{i}")) for i in range(200))), WAIT
    )
    assert all(results)
    assert db.writes - before_writes == 200
    assert db.commits - before_commits < 200


@pytest.mark.asyncio
async def test_lone_write_is_committed_at_once(db: Database, db_path: Path) -> None:
    await Inbox(db).add(message())
    # Another connection sees it: committed, not waiting for a batch to fill.
    with sqlite3.connect(db_path) as other:
        assert other.execute("SELECT count(*) FROM inbox").fetchone()[0] == 1
    other.close()


@pytest.mark.asyncio
async def test_failing_write_fails_only_its_caller(db: Database, db_path: Path) -> None:
    inbox = Inbox(db)
    gate = Gate()
    blocker = await gate.close_on(db)
    before = db.commits

    def half_done_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO inbox (instance, message_id, reply_id, record, state, received_at)"
            " VALUES ('bot', 'bad', 'r', '{}', 'pending', 0)"
        )
        raise ValueError("boom")

    first = asyncio.ensure_future(inbox.add(message("m1")))
    bad = asyncio.ensure_future(db.write(half_done_then_fail))
    broken_sql = asyncio.ensure_future(
        db.write(lambda c: c.execute("INSERT INTO nowhere VALUES (1)"))
    )
    last = asyncio.ensure_future(inbox.add(message("m2")))
    await asyncio.sleep(0.05)
    gate.release.set()
    await asyncio.wait_for(blocker, WAIT)

    assert await asyncio.wait_for(first, WAIT) is True
    assert await asyncio.wait_for(last, WAIT) is True
    with pytest.raises(ValueError, match="boom"):
        await asyncio.wait_for(bad, WAIT)
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        await asyncio.wait_for(broken_sql, WAIT)
    assert db.commits - before == 2  # the gate's batch, then all four in one transaction
    assert await inbox.entry("bot", "bad") is None  # its own insert was rolled back

    await db.close()
    reopened = await Database.open(db_path)
    try:
        assert [m.message_id for m in await Inbox(reopened).pending("bot")] == ["m1", "m2"]
    finally:
        await reopened.close()


@pytest.mark.asyncio
async def test_write_that_commits_itself_is_refused(db: Database) -> None:
    with pytest.raises(sqlite3.ProgrammingError, match="must not commit"):
        await db.write(lambda c: c.execute("COMMIT"))
    assert await db.write(lambda c: 42) == 42  # the worker carries on


@pytest.mark.asyncio
async def test_reads_cannot_write(db: Database) -> None:
    await Inbox(db).add(message())
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        await db.read(lambda c: c.execute("DELETE FROM inbox"))
    assert await db.read(lambda c: c.execute("SELECT count(*) FROM inbox").fetchone()[0]) == 1
    assert await db.write(lambda c: c.execute("DELETE FROM inbox").rowcount) == 1


@pytest.mark.asyncio
async def test_error_keeps_its_traceback(db: Database) -> None:
    def fail(conn: sqlite3.Connection) -> None:
        raise LookupError("from the worker")

    with pytest.raises(LookupError) as info:
        await db.write(fail)
    assert any(entry.name == "fail" for entry in info.traceback)


@pytest.mark.asyncio
async def test_event_loop_is_not_blocked(db: Database) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.ensure_future(ticker())
    try:
        await asyncio.sleep(0)
        started = time.monotonic()
        await asyncio.wait_for(db.write(lambda c: time.sleep(0.3)), WAIT)
        assert time.monotonic() - started >= 0.3
        assert ticks >= 10  # about 30 if the loop ran freely; 0 if the write blocked it
    finally:
        task.cancel()


@pytest.mark.asyncio
async def test_close_is_idempotent_and_finishes_queued_work(db_path: Path) -> None:
    threads_before = set(threading.enumerate())
    db = await Database.open(db_path)
    inbox = Inbox(db)
    adds = [asyncio.ensure_future(inbox.add(message(f"m{i}"))) for i in range(20)]
    await asyncio.sleep(0)  # queued, not yet committed
    await asyncio.wait_for(asyncio.gather(db.close(), db.close()), WAIT)
    assert all(await asyncio.wait_for(asyncio.gather(*adds), WAIT))
    await db.close()
    assert db.closed
    new_threads = set(threading.enumerate()) - threads_before
    assert not [t for t in new_threads if t.name.startswith("sqlite:")]  # the worker was joined
    with pytest.raises(sqlite3.ProgrammingError):
        await inbox.add(message("late"))
    with pytest.raises(sqlite3.ProgrammingError):
        await db.read(lambda c: None)

    reopened = await Database.open(db_path)
    try:
        assert len(await Inbox(reopened).pending("bot")) == 20
    finally:
        await reopened.close()


# -- the inbox ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_add_deduplicates_also_after_reopening(db_path: Path) -> None:
    db = await Database.open(db_path)
    try:
        inbox = Inbox(db)
        assert await inbox.add(message()) is True
        assert await inbox.add(message()) is False
        assert await inbox.add(message(instance="other")) is True  # the key includes the instance
        await inbox.finish(Reply.for_message(message(), "answer", Outcome.ANSWERED))
        assert await inbox.add(message()) is False  # done entries deduplicate too
    finally:
        await db.close()

    db = await Database.open(db_path)
    try:
        assert await Inbox(db).add(message()) is False
        assert await Inbox(db).add(message("m2")) is True
    finally:
        await db.close()


_CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from gateway.models import Incoming
    from gateway.store import Database, Inbox

    async def main():
        db = await Database.open(Path(sys.argv[1]))
        message = Incoming.create(
            instance="bot", message_id="killed", conversation_id="c", sender_id="u",
            text="survive", raw={"k": "v"}, received_at=5.0,
        )
        new = await Inbox(db).add(message)
        print("added" if new else "duplicate", flush=True)
        time.sleep(60)  # killed here, holding the database open, never closing it

    asyncio.run(main())
    """
)


@pytest.mark.asyncio
async def test_added_entry_survives_sigkill(db_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        str(db_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=PROJECT_ROOT,
        env=env,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), WAIT)
        if line != b"added\n":
            assert child.stderr is not None
            child.kill()
            stderr = await asyncio.wait_for(child.stderr.read(), WAIT)
            pytest.fail(f"child said {line!r}: {stderr.decode(errors='replace')}")
        child.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(child.wait(), WAIT) == -signal.SIGKILL
    finally:
        if child.returncode is None:
            child.kill()
            await asyncio.wait_for(child.wait(), WAIT)

    db = await Database.open(db_path)
    try:
        inbox = Inbox(db)
        entry = await inbox.entry("bot", "killed")
        assert entry is not None
        assert entry.state is EntryState.PENDING
        assert entry.message.text == "survive"
        assert entry.message.raw == {"k": "v"}
        assert [m.message_id for m in await inbox.pending("bot")] == ["killed"]
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_pending_finish_entry_round_trip(db: Database) -> None:
    clock = Clock()
    inbox = Inbox(db, clock=clock)
    rich = message(
        "m1",
        conversation_kind=ConversationKind.GROUP,
        mentions=[Mention("bot-id", "Bot")],
        attachments=[Attachment("image", "cat.png", "download-code", "image/png")],
        raw={"nested": {"list": [1, 2.5, None, "é"]}, "flag": True},
    )
    others = [message("m2"), message("m3"), message("elsewhere", instance="other")]
    assert await inbox.add(rich)
    for other in others:
        clock.now += 1
        assert await inbox.add(other)

    pending = await inbox.pending("bot")
    assert pending == [rich, others[0], others[1]]  # oldest first, this instance only
    assert pending[0].raw == rich.raw  # raw is left out of ==
    assert pending[0].reply_id == rich.reply_id

    entry = await inbox.entry("bot", "m1")
    assert entry is not None
    assert entry.message == rich and entry.message.raw == rich.raw
    assert (entry.state, entry.answer, entry.outcome, entry.done_at) == (
        EntryState.PENDING,
        None,
        None,
        None,
    )
    assert entry.attempts == 0
    assert entry.received_at == 1_000_000.0
    assert not entry.done

    clock.now = 1_000_100.0
    await inbox.finish(Reply.for_message(rich, "the answer", Outcome.ANSWERED))
    entry = await inbox.entry("bot", "m1")
    assert entry is not None
    assert entry.done and entry.state is EntryState.DONE
    assert entry.answer == "the answer"
    assert entry.outcome is Outcome.ANSWERED
    assert entry.done_at == 1_000_100.0
    assert await inbox.entry_for_reply("bot", rich.reply_id) == entry
    assert [m.message_id for m in await inbox.pending("bot")] == ["m2", "m3"]

    assert await inbox.entry("bot", "unknown") is None
    with pytest.raises(KeyError):
        await inbox.finish(Reply("bot", "unknown", "r", "", Outcome.FAILED))


@pytest.mark.asyncio
async def test_start_counts_attempts(db: Database, db_path: Path) -> None:
    inbox = Inbox(db)
    await inbox.add(message())
    assert await inbox.start("bot", "m1") == 1
    assert await inbox.start("bot", "m1") == 2
    with pytest.raises(KeyError):
        await inbox.start("bot", "unknown")
    await db.close()

    reopened = await Database.open(db_path)  # a crash-and-restart sees the count
    try:
        inbox = Inbox(reopened)
        assert await inbox.start("bot", "m1") == 3
        entry = await inbox.entry("bot", "m1")
        assert entry is not None and entry.attempts == 3
    finally:
        await reopened.close()


@pytest.mark.asyncio
async def test_prune_deletes_only_old_done_entries(db: Database) -> None:
    clock = Clock(1000.0)
    inbox = Inbox(db, ttl=100.0, clock=clock)
    for message_id in ("old-done", "new-done", "old-pending"):
        await inbox.add(message(message_id))
    await inbox.finish(Reply.for_message(message("old-done"), "a", Outcome.ANSWERED))
    clock.now = 1050.0
    await inbox.finish(Reply.for_message(message("new-done"), "b", Outcome.FAILED))

    clock.now = 1100.0  # exactly ttl after the first finish: not older yet
    assert await inbox.prune() == 0
    clock.now = 1120.0
    assert await inbox.prune() == 1
    assert await inbox.entry("bot", "old-done") is None
    assert await inbox.entry("bot", "new-done") is not None
    assert await inbox.entry("bot", "old-pending") is not None  # never deleted silently
    assert await inbox.add(message("old-done")) is True  # forgotten after the window

    clock.now = 10_000.0
    assert await inbox.prune() == 1  # new-done; the pending ones stay
    assert {m.message_id for m in await inbox.pending("bot")} == {"old-pending", "old-done"}


@pytest.mark.asyncio
async def test_expired_pending(db: Database) -> None:
    clock = Clock(1000.0)
    inbox = Inbox(db, ttl=100.0, clock=clock)
    await inbox.add(message("oldest", instance="other"))
    clock.now = 1010.0
    await inbox.add(message("old"))
    await inbox.add(message("answered"))
    await inbox.finish(Reply.for_message(message("answered"), "x", Outcome.ANSWERED))
    clock.now = 1080.0
    await inbox.add(message("recent"))

    assert await inbox.expired_pending() == []
    clock.now = 1150.0
    expired = await inbox.expired_pending()
    assert [(e.message.instance, e.message.message_id) for e in expired] == [
        ("other", "oldest"),
        ("bot", "old"),
    ]
    assert all(e.state is EntryState.PENDING for e in expired)
    assert await inbox.prune() == 1  # only the answered one; expired pending entries stay

    # The core gives up on them by finishing them as failed; then they age out like the others.
    for e in expired:
        await inbox.finish(Reply.for_message(e.message, "", Outcome.FAILED))
    assert await inbox.expired_pending() == []
    clock.now = 1300.0
    assert await inbox.prune() == 2


def test_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Inbox(None, ttl=0)  # type: ignore[arg-type]


# -- feedback -------------------------------------------------------------------------------------


def click(
    rating: str, *, user_id: str = "u1", at: float, instance: str = "bot", **changes: str
) -> FeedbackEvent:
    fields = {"reply_id": "r1", "message_id": "m1", "comment": ""} | changes
    return FeedbackEvent(
        instance=instance,
        reply_id=fields["reply_id"],
        user_id=user_id,
        rating=rating,
        message_id=fields["message_id"],
        comment=fields["comment"],
        at=at,
    )


@pytest.mark.asyncio
async def test_feedback_second_click_replaces_first(db: Database) -> None:
    store = FeedbackStore(db)
    await store.record(click("helpful", at=10.0, comment="nice"), question="q?", answer="a.")
    await store.record(
        click("unhelpful", at=20.0, message_id=""), question="", answer=""
    )  # a platform that sends the ids with the first click only
    [row] = await store.rows()
    assert (row.rating, row.comment, row.at) == ("unhelpful", "", 20.0)
    assert (row.message_id, row.question, row.answer) == ("m1", "q?", "a.")
    assert (row.instance, row.reply_id, row.user_id) == ("bot", "r1", "u1")


@pytest.mark.asyncio
async def test_feedback_rows_are_per_user_reply_instance_newest_first(db: Database) -> None:
    store = FeedbackStore(db)
    record = store.record
    await record(click("helpful", user_id="u1", at=10.0), question="q", answer="a")
    await record(click("helpful", user_id="u2", at=30.0), question="q", answer="a")
    await record(click("helpful", at=20.0, reply_id="r2"), question="q2", answer="a2")
    await record(click("unhelpful", at=40.0, instance="other"), question="q", answer="a")

    rows = await store.rows()
    assert [(r.instance, r.reply_id, r.user_id) for r in rows] == [
        ("other", "r1", "u1"),
        ("bot", "r1", "u2"),
        ("bot", "r2", "u1"),
        ("bot", "r1", "u1"),
    ]
    assert [r.at for r in await store.rows("bot")] == [30.0, 20.0, 10.0]
    assert await store.rows("nobody") == []
