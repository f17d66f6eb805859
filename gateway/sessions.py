"""One turn at a time per session, many sessions in parallel up to a limit.

Jobs are queued per session key at submission time, synchronously, so the order of delivery is the
order of answering (a lock acquired later inside each task would not guarantee that).  A session's
worker holds a slot of the instance-wide semaphore only while a job runs, so a busy session never
blocks the others from using free slots.

Each job runs in a task of its own, so :meth:`SessionScheduler.cancel_running` can stop the turn of
one session (``/stop``, busy = interrupt) while the session goes on with its next job.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable

__all__ = ["SessionScheduler"]

Job = Callable[[], Awaitable[None]]

_log = logging.getLogger("gateway")


class SessionScheduler:
    def __init__(self, concurrency: int) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        self._queues: dict[str, collections.deque[Job]] = {}
        self._current: dict[str, asyncio.Task[None]] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self.running = 0

    @property
    def busy(self) -> bool:
        return bool(self._workers)

    def session_busy(self, key: str) -> bool:
        """True while the session has a job running or waiting."""
        return key in self._queues

    def session_running(self, key: str) -> bool:
        """True while a job of the session runs (it holds a slot)."""
        task = self._current.get(key)
        return task is not None and not task.done()

    def submit(self, key: str, job: Job) -> None:
        queue = self._queues.get(key)
        if queue is not None:
            queue.append(job)
            return
        self._queues[key] = collections.deque([job])
        worker = asyncio.get_running_loop().create_task(self._work(key), name=f"session:{key}")
        self._workers.add(worker)
        worker.add_done_callback(self._workers.discard)

    def cancel_running(self, key: str) -> bool:
        """Cancel the running job of one session (the job finalises itself); the session goes on
        with its next job.  False if no job of the session is running."""
        task = self._current.get(key)
        if task is None or task.done():
            return False
        return task.cancel()

    async def _work(self, key: str) -> None:
        queue = self._queues[key]
        me = asyncio.current_task()
        assert me is not None
        try:
            while queue:
                job = queue.popleft()
                async with self._slots:
                    self.running += 1
                    task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
                        _run(job), name=f"turn:{key}"
                    )
                    self._current[key] = task
                    try:
                        # Cancelling this worker (shutdown) cancels the job through this await.
                        await task
                    except asyncio.CancelledError:
                        if me.cancelling():
                            raise
                        # Only the job was cancelled (cancel_running): go on with the next one.
                    except Exception:
                        _log.exception("a turn of session %s failed", key)
                    finally:
                        self.running -= 1
                        del self._current[key]
        finally:
            del self._queues[key]

    async def wait(self, timeout: float) -> bool:
        """Wait until every queued job ran; False if ``timeout`` passed first."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._workers:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            await asyncio.wait(set(self._workers), timeout=remaining)
        return True

    async def cancel(self) -> None:
        """Cancel every session (their jobs finalise their replies) and wait for them."""
        workers = set(self._workers)
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


async def _run(job: Job) -> None:
    await job()
