"""``kill -9`` of the real ``gateway run`` process in the middle of a burst of slow answers, then a
restart on the same state directory: every message is answered exactly once, no reply is left
unfinished, and messages sent while the gateway was down are answered too."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway_testkit.harness import FaultInjection, instance_document
from gateway_testkit.process import GatewayProcess, GatewayProcesses

from ._support import assert_answered_once, wait_connected

BURST = 12
LATE = 4  # sent after the kill, while no gateway is connected


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[GatewayProcesses]:
    with GatewayProcesses(tmp_path) as processes:
        yield processes


def run(gateways: GatewayProcesses, root: Path) -> GatewayProcess:
    return gateways.start(
        "run",
        "--instances",
        root / "instances",
        "--config",
        root / "gateway.toml",
        "--no-http",
        cwd=root,
    )


async def test_kill_9_mid_burst_then_restart_answers_everything_once(
    harness: FaultInjection,
    gateways: GatewayProcesses,
    tmp_path: Path,
    record_property: pytest.RecordProperty,
) -> None:
    folder = tmp_path / "instances"
    folder.mkdir()
    # Eleven words at 0.2 s each: every answer is still streaming when the process is killed.
    agent = {"type": "echo", "delay": 0.2}
    document = instance_document(harness, agent, conversation={"concurrency": 32})
    (folder / f"{harness.instance}.json").write_text(json.dumps(document))
    (tmp_path / "gateway.toml").write_text('state_dir = "state"\nshutdown_grace = 1.0\n')

    texts = {
        f"kill-{i}": f"slow answer number {i} with a few more words in it" for i in range(BURST)
    }
    first = run(gateways, tmp_path)
    async with asyncio.timeout(60):
        await wait_connected(harness, timeout=20)
        await asyncio.gather(
            *(
                harness.send(t, sender=f"user{i}", message_id=m)
                for i, (m, t) in enumerate(texts.items())
            )
        )

        async def all_started() -> None:
            while not all([(await harness.reply(m)).state == "streaming" for m in texts]):
                await asyncio.sleep(0.02)

        await asyncio.wait_for(all_started(), 10)
        first.kill()  # SIGKILL: no shutdown, no finalisation
        assert await first.wait_exit(5) == -signal.SIGKILL
        unfinished = [m for m in texts if harness.reply_record(m).unfinished]
        assert unfinished, "every answer was done before the kill: the test proves nothing"
        async with asyncio.timeout(5):
            while harness.connections():
                await asyncio.sleep(0.02)

        second = run(gateways, tmp_path)  # same folder, same state directory
        restarted = time.monotonic()
        late = {f"late-{i}": f"sent while the gateway was down {i}" for i in range(LATE)}
        # Pushed as soon as the restarted gateway connects (``send`` waits for a connection).
        await asyncio.gather(
            *(
                harness.send(t, sender=f"late{i}", message_id=m)
                for i, (m, t) in enumerate(late.items())
            )
        )
        record_property("restart_to_late_messages_acked_s", round(time.monotonic() - restarted, 3))
        await assert_answered_once(harness, {**texts, **late}, timeout=30)

        # Answers that ended on the platform just before the kill may be resumed too (and then
        # update the reply they have): at least the unfinished ones must be.
        log = await second.wait_log("unanswered message(s)", timeout=5)
        resumed = re.search(r"resuming (\d+) unanswered message", log)
        assert resumed and int(resumed[1]) >= len(unfinished), log
        second.send(signal.SIGTERM)
        assert await second.wait_exit(10) == 0, second.describe()
    assert "Traceback" not in second.stderr, second.stderr
