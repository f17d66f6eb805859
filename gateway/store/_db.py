"""One SQLite file, one connection, one thread: the gateway's durable state.

Why it is built this way:

* **Durable before the ACK.**  A driver ACKs a message once ``inbox.add`` returned, and the platform
  then forgets it; so a returned write must survive a crash *and a power cut*.  Hence WAL with
  ``synchronous=FULL`` (``NORMAL`` would lose the last commits on power loss), and a caller's future
  resolves only after the COMMIT that contains its write.
* **Never on the event loop.**  SQLite calls block (an fsync takes milliseconds, much more on a busy
  disk), so they all run in one dedicated worker thread that owns the only connection.  One
  connection also means no lock contention inside the process; ``busy_timeout`` covers other
  processes (a CLI export) holding the lock for a moment.
* **Group commit.**  The fsync is the cost of a write.  The worker takes every job queued when it
  wakes up and runs all the writes in one transaction with one COMMIT, so a burst of messages shares
  a few fsyncs while a lone write is still committed at once (there is no timer to wait for).  Each
  write runs inside its own SAVEPOINT, so a failing one is rolled back alone and fails only its own
  caller.

Stores register their tables with :func:`register_schema` at import time (idempotent
``CREATE ... IF NOT EXISTS``); :meth:`Database.open` creates them.  A later incompatible change
would add a ``PRAGMA user_version`` step there.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, cast

import attrs

__all__ = ["Database", "register_schema"]

T = TypeVar("T")

_log = logging.getLogger("gateway.store")

#: How long a statement waits for another process's lock before failing with "database is locked".
_BUSY_TIMEOUT_MS = 5000
#: The most jobs one batch takes, so a flood cannot make one transaction (and its callers' wait)
#: grow without bound; what is left is simply the next batch.
_MAX_BATCH = 1000

_schemas: dict[str, tuple[str, ...]] = {}


def register_schema(name: str, statements: Iterable[str]) -> None:
    """Declare the DDL of one store (``name`` keeps a re-import from adding it twice).

    Every statement must be idempotent (``CREATE TABLE IF NOT EXISTS`` ...): they run on each
    :meth:`Database.open`, in registration order, in one transaction.  Databases opened before a
    registration do not get it, which is why stores register when their module is imported.
    """
    _schemas[name] = tuple(statements)


class _Kind(enum.Enum):
    OPEN = "open"
    READ = "read"
    WRITE = "write"
    STOP = "stop"


@attrs.define
class _Job:
    """One request to the worker and the caller's future.  Mutable only for ``settled``, which the
    worker uses to resolve every job exactly once whatever goes wrong."""

    kind: _Kind
    fn: Callable[[sqlite3.Connection], Any] | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    settled: bool = False

    def settle(
        self,
        value: Any = None,
        error: BaseException | None = None,
        *,
        into: _Settled | None = None,
    ) -> None:
        """Resolve the caller's future from the worker thread (no-op the second time); with
        ``into``, only collect it there, for one :meth:`_Settled.flush` of the whole batch."""
        if self.settled:
            return
        self.settled = True
        if into is not None:
            into.add(self, value, error)
            return
        # The caller's loop may be closed (it was cancelled and went away): nobody is waiting.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_resolve, self.future, value, error)


_Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]


class _Settled:
    """The outcomes of one batch, handed to each caller loop in one ``call_soon_threadsafe``.

    One per job would wake the loop through its self-pipe once per job (a syscall on each side
    and a GIL hand-over each time): a burst of messages makes several writes per message, and
    that showed as a measurable share of the gateway's CPU."""

    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}

    def add(self, job: _Job, value: Any, error: BaseException | None) -> None:
        self._by_loop.setdefault(job.loop, []).append((job.future, value, error))

    def flush(self) -> None:
        by_loop, self._by_loop = self._by_loop, {}
        for loop, outcomes in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting
                loop.call_soon_threadsafe(_resolve_all, outcomes)


def _resolve_all(outcomes: list[_Outcome]) -> None:
    for future, value, error in outcomes:
        _resolve(future, value, error)


def _resolve(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled by its caller
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


class Database:
    """The state database.  Build it with :meth:`open`; share one per process; :meth:`close` it.

    ``write(fn)`` and ``read(fn)`` run ``fn(connection)`` in the worker thread and return its
    result.  ``fn`` must return plain data (never a cursor: the connection belongs to the worker)
    and must not commit or roll back; a write's effects are committed when ``write`` returns.
    A write ``fn`` may be called a second time (its first run rolled back, when another write of
    its batch failed), so it must have no effect outside the connection.
    Exceptions raised by ``fn`` (including ``sqlite3`` errors, which mean a bug or a disk problem)
    reach the caller unchanged, traceback included.  Cancelling the caller does not cancel a write
    that was queued: it may still be committed.
    """

    def __init__(self, path: Path) -> None:
        """Internal: use :meth:`open`."""
        self.path = path
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        # Guards _closing/_finished against the check-then-enqueue race with close() and the worker.
        self._lock = threading.Lock()
        self._closing = True  # until open() starts the worker
        self._finished = False
        self._thread: threading.Thread | None = None
        self._commits = 0
        self._writes = 0

    @classmethod
    async def open(cls, path: Path) -> Database:
        """Open (or create, with its parent directories and tables) the database at ``path``."""
        db = cls(Path(path))
        loop = asyncio.get_running_loop()
        ready = _Job(_Kind.OPEN, None, loop, loop.create_future())
        db._thread = threading.Thread(
            target=db._main,
            args=(ready,),
            name=f"sqlite:{db.path.name}",
            # A daemon thread cannot keep the process alive if close() is forgotten.  That loses
            # nothing: a write is acknowledged only after its COMMIT, and WAL survives a kill.
            daemon=True,
        )
        db._closing = False
        db._thread.start()
        try:
            await ready.future
        except BaseException:
            # Failed to open (the worker has stopped) or cancelled (stop the worker once it is up).
            db._request_stop(None)
            raise
        return db

    @property
    def commits(self) -> int:
        """How many write transactions were committed (for tests and metrics: compare with
        :attr:`writes` to see group commit at work)."""
        return self._commits

    @property
    def writes(self) -> int:
        """How many writes were committed."""
        return self._writes

    @property
    def closed(self) -> bool:
        return self._closing

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in a transaction (shared with concurrent writes); return once committed."""
        return await self._submit(_Kind.WRITE, fn)

    def submit_write(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue the write and return its future at once (resolved after the COMMIT), for callers
        that must act on its outcome even if they are cancelled meanwhile: they add a done
        callback and await ``asyncio.shield(future)``.  Raises ``sqlite3.ProgrammingError`` at
        once if the database is closed."""
        return self._enqueue(_Kind.WRITE, fn)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on a read-only view (``PRAGMA query_only``: a write in it raises)."""
        return await self._submit(_Kind.READ, fn)

    async def close(self) -> None:
        """Finish the jobs already queued, close the connection and end the worker.  Idempotent;
        ``write``/``read`` raise ``sqlite3.ProgrammingError`` from the first call on."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        if self._request_stop(_Job(_Kind.STOP, None, loop, done)):
            await done
        if self._thread is not None:
            # The worker resolves close futures as its very last step, so this returns at once.
            self._thread.join()

    # -- the caller's side -----------------------------------------------------------------------

    async def _submit(self, kind: _Kind, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._enqueue(kind, fn)

    def _enqueue(self, kind: _Kind, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        job = _Job(kind, fn, loop, loop.create_future())
        with self._lock:
            if self._closing:
                raise sqlite3.ProgrammingError(f"the database {self.path} is closed")
            self._queue.put(job)
        return cast("asyncio.Future[T]", job.future)

    def _request_stop(self, job: _Job | None) -> bool:
        """Queue a stop; False if the worker is already gone (nothing will resolve ``job``)."""
        with self._lock:
            self._closing = True
            if self._finished or self._thread is None:
                return False
            if job is None:
                loop = asyncio.get_running_loop()
                job = _Job(_Kind.STOP, None, loop, loop.create_future())
            self._queue.put(job)
            return True

    # -- the worker thread -----------------------------------------------------------------------

    def _main(self, ready: _Job) -> None:
        conn: sqlite3.Connection | None = None
        batch: list[_Job] = []
        try:
            conn = _connect(self.path)
            ready.settle()
            while True:
                batch = self._next_batch()
                work = [job for job in batch if job.kind is not _Kind.STOP]
                self._run_batch(conn, work)
                if len(work) < len(batch):
                    break
        except BaseException as exc:
            if ready.settled:  # not an open() failure, which its caller reports: a worker bug
                _log.critical("the database worker stopped on an unexpected error", exc_info=True)
            ready.settle(error=exc)
            for job in batch:
                if job.kind is not _Kind.STOP:
                    job.settle(error=exc)
        finally:
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    _log.exception("closing the database %s failed", self.path)
            with self._lock:
                self._closing = True
                self._finished = True
            # Nothing can be queued any more; resolve what was (close() calls racing the first one,
            # or work left behind by a crash), then the close() callers, last.
            leftovers = batch + _drain(self._queue)
            for job in leftovers:
                if job.kind is not _Kind.STOP:
                    job.settle(
                        error=sqlite3.ProgrammingError(f"the database {self.path} is closed")
                    )
            for job in leftovers:
                job.settle()

    def _next_batch(self) -> list[_Job]:
        batch = [self._queue.get()]
        while len(batch) < _MAX_BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run_batch(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        """Writes first (one transaction), then reads, which then see those writes.  Every job of a
        batch was queued before any of them ran, so they are concurrent and this order is valid."""
        writes = [job for job in jobs if job.kind is _Kind.WRITE]
        reads = [job for job in jobs if job.kind is _Kind.READ]
        if writes:
            self._run_writes(conn, writes)
        if reads:
            _run_reads(conn, reads)

    def _run_writes(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        """The batch's writes in one transaction, optimistically without a savepoint each.

        Savepoints tripled the statements per write, and each statement hands the GIL over to and
        back from the busy event loop.  Writes nearly never fail; when one does, the transaction
        is rolled back before anything was resolved, and :meth:`_run_writes_isolated` runs the
        batch again with each write in its own savepoint (so ``fn`` may run twice, its first run
        undone: it must have no effect outside the connection)."""
        done: list[tuple[_Job, Any]] = []  # ran; resolved only after the COMMIT
        try:
            conn.execute("BEGIN IMMEDIATE")
        except Exception:
            _rollback(conn)
            self._run_writes_isolated(conn, jobs)  # fails the same way, for each caller
            return
        for index, job in enumerate(jobs):
            assert job.fn is not None
            try:
                value = job.fn(conn)
            except Exception:
                _rollback(conn)
                self._run_writes_isolated(conn, jobs)
                return
            if not conn.in_transaction:
                # It committed or rolled back by itself, so what the writes before it did may be
                # kept: none of them runs again.  As in the isolated path, they all fail.
                error = sqlite3.ProgrammingError(
                    "a Database.write function must not commit or roll back"
                )
                job.settle(error=error)
                _abandon(done, error)
                if index + 1 < len(jobs):
                    self._run_writes_isolated(conn, jobs[index + 1 :])
                return
            done.append((job, value))
        try:
            conn.execute("COMMIT")
        except Exception as exc:
            _rollback(conn)
            for job, _ in done:
                job.settle(error=exc)
            return
        self._commits += 1
        self._writes += len(done)
        settled = _Settled()
        for job, value in done:
            job.settle(value, into=settled)
        settled.flush()

    def _run_writes_isolated(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        """The writes in one transaction, each in its own savepoint, so a failing one is rolled
        back alone and fails only its own caller."""
        done: list[tuple[_Job, Any]] = []  # ran and released; resolved only after the COMMIT
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in jobs:
                assert job.fn is not None
                conn.execute("SAVEPOINT job")
                try:
                    value = job.fn(conn)
                except Exception as exc:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK TO job")
                        conn.execute("RELEASE job")
                        job.settle(error=exc)
                        continue
                    # SQLite aborts the whole transaction on some errors (disk full, I/O error):
                    # the writes before this one went with it.
                    job.settle(error=exc)
                    _abandon(done, exc)
                    conn.execute("BEGIN IMMEDIATE")
                    continue
                if not conn.in_transaction:
                    error = sqlite3.ProgrammingError(
                        "a Database.write function must not commit or roll back"
                    )
                    job.settle(error=error)
                    _abandon(done, error)
                    conn.execute("BEGIN IMMEDIATE")
                    continue
                conn.execute("RELEASE job")
                done.append((job, value))
            conn.execute("COMMIT")
        except Exception as exc:
            _rollback(conn)
            for job in jobs:  # a no-op for those already resolved
                job.settle(error=exc)
            return
        self._commits += 1
        self._writes += len(done)
        settled = _Settled()
        for job, value in done:
            job.settle(value, into=settled)
        settled.flush()


def _run_reads(conn: sqlite3.Connection, jobs: list[_Job]) -> None:
    """Run reads in one read transaction (each sees a consistent snapshot), writes forbidden."""
    settled = _Settled()
    try:
        conn.execute("PRAGMA query_only = ON")
        conn.execute("BEGIN")
        for job in jobs:
            assert job.fn is not None
            try:
                value = job.fn(conn)
            except Exception as exc:
                job.settle(error=exc, into=settled)
            else:
                job.settle(value, into=settled)
    except Exception as exc:
        for job in jobs:
            job.settle(error=exc, into=settled)
    finally:
        _rollback(conn)
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA query_only = OFF")
        settled.flush()


def _abandon(done: list[tuple[_Job, Any]], cause: BaseException) -> None:
    """Fail the writes whose transaction ended under them (their effects may be gone)."""
    if not done:
        return
    error = sqlite3.OperationalError(
        "the transaction was ended by a later write in the same batch; this write was not kept"
    )
    error.__cause__ = cause
    for job, _ in done:
        job.settle(error=error)
    done.clear()


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            _log.exception("rolling back a database transaction failed")


def _drain(jobs: queue.SimpleQueue[_Job]) -> list[_Job]:
    found: list[_Job] = []
    while True:
        try:
            found.append(jobs.get_nowait())
        except queue.Empty:
            return found


def _connect(path: Path) -> sqlite3.Connection:
    """Open the connection (in the worker thread, which then owns it) and create the tables."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit transactions; the worker issues BEGIN/COMMIT itself.
    conn = sqlite3.connect(path, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            # Some file systems (network mounts) cannot do WAL.  The rollback journal with
            # synchronous=FULL is just as durable, only slower.
            _log.warning("the database %s cannot use WAL (journal mode %s)", path, mode)
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("BEGIN IMMEDIATE")
        for statements in _schemas.values():
            for statement in statements:
                conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.close()
        raise
    return conn
