"""One turn at a time per session, many sessions in parallel up to a limit.

Jobs are queued per session key at submission time, synchronously, so the order of delivery is the
order of answering (a lock acquired later inside each task would not guarantee that).  A session's
worker holds a slot of the instance-wide semaphore only while a job runs, so a busy session never
blocks the others from using free slots.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable

__all__ = ["SessionScheduler"]

Job = Callable[[], Awaitable[None]]


class SessionScheduler:
    def __init__(self, concurrency: int) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        self._queues: dict[str, collections.deque[Job]] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self.running = 0

    @property
    def busy(self) -> bool:
        return bool(self._workers)

    def submit(self, key: str, job: Job) -> None:
        queue = self._queues.get(key)
        if queue is not None:
            queue.append(job)
            return
        self._queues[key] = collections.deque([job])
        worker = asyncio.get_running_loop().create_task(self._work(key), name=f"session:{key}")
        self._workers.add(worker)
        worker.add_done_callback(self._workers.discard)

    async def _work(self, key: str) -> None:
        queue = self._queues[key]
        try:
            while queue:
                job = queue.popleft()
                async with self._slots:
                    self.running += 1
                    try:
                        await job()
                    finally:
                        self.running -= 1
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
