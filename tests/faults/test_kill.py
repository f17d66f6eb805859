"""``kill -9`` of the real ``gateway run`` process in the middle of a burst of slow answers, then a
restart on the same state directory: every message is answered exactly once, no reply is left
unfinished, and messages sent while the gateway was down are answered too.  A second case kills
the gateway with pushes in flight: frames on its socket that it never ACKed, which the platform
delivers again (at-least-once) to the restarted gateway."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path

import pytest

from gateway_testkit.harness import FaultInjection, instance_document
from gateway_testkit.process import GatewayProcess, GatewayProcesses

from ._support import all_streaming, assert_answered_once, send_all, wait_connected

BURST = 12
LATE = 4  # sent after the kill, while no gateway is connected
IN_FLIGHT = 8  # pushed to a frozen gateway: on its socket, never ACKed before the kill
#: Eleven words at 0.2 s each: every answer is still streaming when the process is killed.
SLOW = {"type": "echo", "delay": 0.2}


def prepare(harness: FaultInjection, root: Path) -> None:
    """An instance folder and a ``gateway.toml`` for ``gateway run`` in ``root``."""
    folder = root / "instances"
    folder.mkdir()
    document = instance_document(harness, SLOW, conversation={"concurrency": 32})
    (folder / f"{harness.instance}.json").write_text(json.dumps(document))
    (root / "gateway.toml").write_text('state_dir = "state"\nshutdown_grace = 1.0\n')


async def kill_9(process: GatewayProcess, harness: FaultInjection) -> None:
    """SIGKILL: no shutdown, no finalisation; returns once the platform saw the socket close."""
    process.kill()
    assert await process.wait_exit(5) == -signal.SIGKILL
    async with asyncio.timeout(5):
        while harness.connections():
            await asyncio.sleep(0.02)


async def stop(process: GatewayProcess) -> None:
    process.send(signal.SIGTERM)
    assert await process.wait_exit(10) == 0, process.describe()
    assert "Traceback" not in process.stderr, process.stderr


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
    prepare(harness, tmp_path)
    texts = {
        f"kill-{i}": f"slow answer number {i} with a few more words in it" for i in range(BURST)
    }
    first = run(gateways, tmp_path)
    async with asyncio.timeout(60):
        await wait_connected(harness, timeout=20)
        await send_all(harness, texts, "user")
        await asyncio.wait_for(all_streaming(harness, texts), 10)
        await kill_9(first, harness)
        unfinished = [m for m in texts if harness.reply_record(m).unfinished]
        assert unfinished, "every answer was done before the kill: the test proves nothing"

        second = run(gateways, tmp_path)  # same folder, same state directory
        restarted = time.monotonic()
        late = {f"late-{i}": f"sent while the gateway was down {i}" for i in range(LATE)}
        # Pushed as soon as the restarted gateway connects (``send`` waits for a connection).
        await send_all(harness, late, "late")
        record_property("restart_to_late_messages_acked_s", round(time.monotonic() - restarted, 3))
        await assert_answered_once(harness, {**texts, **late}, timeout=30)

        # Answers that ended on the platform just before the kill may be resumed too (and then
        # update the reply they have): at least the unfinished ones must be.
        log = await second.wait_log("unanswered message(s)", timeout=5)
        resumed = re.search(r"resuming (\d+) unanswered message", log)
        assert resumed and int(resumed[1]) >= len(unfinished), log
        await stop(second)


async def test_kill_9_with_pushes_in_flight_then_restart_answers_everything_once(
    harness: FaultInjection,
    gateways: GatewayProcesses,
    tmp_path: Path,
) -> None:
    """Frames pushed but never ACKed when the process dies are the platform's to deliver again:
    the restarted gateway gets them (with the answers cut short by the kill) and answers each
    once.  SIGSTOP first makes "in flight" certain: the frozen process reads nothing, so every
    frame pushed meanwhile sits unACKed on its socket when SIGKILL comes."""
    harness.redeliver_unacked_after(0.5)
    prepare(harness, tmp_path)
    streaming = {f"cut-{i}": f"an answer cut short by the kill number {i}" for i in range(4)}
    in_flight = {f"flight-{i}": f"pushed to a gateway about to die {i}" for i in range(IN_FLIGHT)}
    first = run(gateways, tmp_path)
    async with asyncio.timeout(60):
        await wait_connected(harness, timeout=20)
        await send_all(harness, streaming, "cut")
        await asyncio.wait_for(all_streaming(harness, streaming), 10)
        first.send(signal.SIGSTOP)
        # Each send returns once its message is ACKed: by the restarted gateway, after the
        # platform delivered it again.
        sending = asyncio.create_task(send_all(harness, in_flight, "flight"))
        await asyncio.sleep(0.5)  # the pushes reach the frozen socket (and are pushed again)
        assert not sending.done(), "a send ended while the gateway was frozen"
        await kill_9(first, harness)
        assert [m for m in streaming if harness.reply_record(m).unfinished], (
            "every answer was done before the kill: the test proves nothing"
        )

        second = run(gateways, tmp_path)  # same folder, same state directory
        await sending
        await assert_answered_once(harness, {**streaming, **in_flight}, timeout=30)
        await stop(second)
