"""A first benchmark of the gateway core, end to end through the real ``gateway run`` and echo.

    python bench/core_echo.py [--messages N] [--concurrency C] [--json out.json] [--repeat K]

Three scenarios, all on loopback, each bounded in time:

1. **fast** (``--messages`` N=2000, ``--concurrency`` C=64): the echo agent with ``delay = 0``, so
   what is measured is the core itself: HTTP in, ``Inbox.add`` (a durable SQLite commit), the
   reply stream, the session scheduler, pacing, ``Inbox.start``/``finish``, SSE out.  For every
   message, from the moment the POST is sent:

   * **ack**: the HTTP response headers.  Echo sends them only after ``context.deliver`` returned,
     i.e. after the message was committed to the inbox (WAL, ``synchronous=FULL``): this is the
     latency a real platform would see before its ACK.
   * **thinking**: the ``thinking`` event (the placeholder the core shows at once).
   * **final**: the ``final`` event (the whole answer is out and the stream ends).

   Throughput is N / (last ``final`` - first send).

2. **slow** (200 messages of 5 words, 200 in flight, agent ``delay = 0.05`` s per word, so
   0.25 s of agent time per message): shows that turns run in parallel.  The makespan is compared
   with the serial lower bound (N x 0.25 s) and with the bound set by the instance's
   ``[conversation] concurrency`` slots (ceil(N / slots) x 0.25 s).

3. **inbox** (in this process, no HTTP): N concurrent ``Inbox.add`` calls on a fresh SQLite file,
   then a few sequential ones for comparison.  ``Database.commits`` vs ``Database.writes`` shows
   the group commit: many writes share one COMMIT (one fsync).

The gateway runs as a subprocess with its own temp dir (``gateway.toml`` with ``state_dir``
there, one echo instance on a free 127.0.0.1 port, ``terminal = "off"``) and is killed in a
``finally``.  Client and gateway share the machine: on a 2-core box the client's own CPU use is
part of what is measured (the JSON has the CPU seconds of both).

This file is not a test: pytest only collects ``tests/`` (``testpaths`` in tox.ini) and this name
does not match ``test_*.py`` anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from _common import (
    child_env,
    cpu_seconds,
    meta,
    percentiles,
    profile_summary,
    profile_written,
    profiling,
)

from gateway.models import Incoming
from gateway.store import Database, Inbox
from gateway_testkit.process import GatewayProcess, free_port

# -- the gateway under test ---------------------------------------------------------------------

_GATEWAY_TOML = """\
state_dir = "{state_dir}"
shutdown_grace = 2.0

# No operations endpoint: its default port 8780 may be taken by a test running beside us.
[http]
enabled = false

[log]
level = "{log_level}"
"""

_INSTANCE_TOML = """\
type = "echo"

[settings]
host = "127.0.0.1"
port = {port}
terminal = "off"

[agent]
type = "echo"
delay = {delay}

[reply]
update_interval = 0

[conversation]
concurrency = {slots}
"""


class Gateway:
    """``gateway run`` in a temp dir with one echo instance; ``async with`` starts and kills it."""

    def __init__(
        self,
        *,
        delay: float,
        slots: int,
        log_level: str,
        workdir: Path,
        profile: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._workdir = workdir
        (workdir / "instances").mkdir(parents=True)
        (workdir / "gateway.toml").write_text(
            _GATEWAY_TOML.format(state_dir=workdir / "state", log_level=log_level)
        )
        (workdir / "instances" / "bench.toml").write_text(
            _INSTANCE_TOML.format(port=self.port, delay=delay, slots=slots)
        )
        self.process: GatewayProcess | None = None
        self._profile = profile

    async def __aenter__(self) -> Gateway:
        self.process = GatewayProcess(
            ["run", "--instances", "instances", "--config", "gateway.toml"],
            cwd=self._workdir,
            env=child_env(self._profile),
            logs=self._workdir / "gateway",  # gateway.stdout / gateway.stderr
        )
        try:
            await self.process.wait_http(self.base, timeout=30.0)
        except BaseException:
            self.process.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Always reached (also on errors and timeouts): SIGTERM for a clean stop, then SIGKILL.
        assert self.process is not None
        self.process.send(signal.SIGTERM)
        try:
            await self.process.wait_exit(5.0)
        except AssertionError:
            pass
        finally:
            self.process.stop()

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid) if self.process else math.nan


# -- the client -----------------------------------------------------------------------------------


async def send_one(
    session: aiohttp.ClientSession, base: str, i: int, text: str
) -> dict[str, float]:
    """POST message ``i`` (its own conversation and sender) and time its reply's events, in
    seconds after the send."""
    body = {"text": text, "id": f"m{i}", "conversation": f"c{i}", "sender": f"u{i}"}
    t0 = time.perf_counter()
    times = {"sent": t0}
    async with session.post(f"{base}/messages", json=body) as response:
        # aiohttp returns here once the status line and headers were read: the ACK.
        times["ack"] = time.perf_counter() - t0
        if response.status != 200:
            raise RuntimeError(f"message {i}: HTTP {response.status}: {await response.text()}")
        # The SSE body: "event: NAME" lines; the stream ends after "final" (or "error").
        async for line in response.content:
            if not line.startswith(b"event:"):
                continue
            name = line[len(b"event:") :].strip().decode()
            if name in ("thinking", "final"):
                times.setdefault(name, time.perf_counter() - t0)
            elif name in ("error", "duplicate"):
                raise RuntimeError(f"message {i}: unexpected {name!r} event")
    if "final" not in times:
        raise RuntimeError(f"message {i}: the stream ended without 'final'")
    times.setdefault("thinking", math.nan)  # echo always sends it; NaN would show a regression
    return times


async def drive(base: str, first: int, count: int, concurrency: int, text: str) -> list[dict]:
    """Send messages ``first .. first+count-1`` with at most ``concurrency`` in flight."""
    results: list[dict[str, float]] = []
    next_index = first
    connector = aiohttp.TCPConnector(limit=concurrency)  # one keep-alive connection per worker
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal next_index
            while next_index < first + count:
                i, next_index = next_index, next_index + 1
                results.append(await send_one(session, base, i, text))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


# -- the scenarios --------------------------------------------------------------------------------


async def scenario_fast(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Many messages, agent without delay: the core's own latency and throughput."""
    text = "hello from the benchmark"
    async with Gateway(
        delay=0, slots=args.slots, log_level=args.log_level, workdir=workdir
    ) as gateway:
        # Warm-up (not measured): opens the client's keep-alive connections, first SQLite pages...
        await drive(gateway.base, 10**9, args.warmup, args.concurrency, text)
        cpu_gateway, cpu_client = gateway.cpu_seconds(), time.process_time()
        results = await drive(gateway.base, 0, args.messages, args.concurrency, text)
        cpu_gateway = gateway.cpu_seconds() - cpu_gateway
        cpu_client = time.process_time() - cpu_client
    start = min(r["sent"] for r in results)
    end = max(r["sent"] + r["final"] for r in results)
    wall = end - start
    return {
        "messages": len(results),
        "concurrency": args.concurrency,
        "slots": args.slots,
        "warmup": args.warmup,
        "wall_s": wall,
        "msgs_per_s": len(results) / wall,
        "ack": percentiles([r["ack"] for r in results]),
        "thinking": percentiles([r["thinking"] for r in results]),
        "final": percentiles([r["final"] for r in results]),
        # CPU seconds used during the measured part: gateway near 1.0 x wall means its event loop
        # (one core, GIL) is the bottleneck.
        "gateway_cpu_s": cpu_gateway,
        "client_cpu_s": cpu_client,
    }


async def scenario_slow(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """A slow agent: N messages of 5 words, ``delay`` per word, all in flight at once."""
    words, delay = 5, 0.05
    text = " ".join(["word"] * words)
    agent_time = words * delay  # seconds of agent time per message (the echo agent sleeps)
    n = args.slow_messages
    async with Gateway(
        delay=delay, slots=args.slots, log_level=args.log_level, workdir=workdir
    ) as gateway:
        results = await drive(gateway.base, 0, n, args.slow_concurrency, text)
    start = min(r["sent"] for r in results)
    makespan = max(r["sent"] + r["final"] for r in results) - start
    parallel = min(args.slots, args.slow_concurrency, n)
    return {
        "messages": n,
        "concurrency": args.slow_concurrency,
        "slots": args.slots,
        "agent_time_s": agent_time,
        "makespan_s": makespan,
        "serial_bound_s": n * agent_time,
        "slot_bound_s": math.ceil(n / parallel) * agent_time,
        "speedup_vs_serial": n * agent_time / makespan,
        "ack": percentiles([r["ack"] for r in results]),
        "final": percentiles([r["final"] for r in results]),
    }


async def scenario_inbox(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """``Inbox.add`` alone: N concurrent adds, then ``serial`` adds one after the other."""
    n, serial = args.inbox_adds, args.inbox_serial
    messages = [
        Incoming.create(
            instance="bench",
            message_id=f"m{i}",
            conversation_id=f"c{i}",
            sender_id=f"u{i}",
            text="hello from the benchmark",
        )
        for i in range(n + serial)
    ]
    db = await Database.open(workdir / "inbox.sqlite3")
    try:
        inbox = Inbox(db)
        t0 = time.perf_counter()
        added = await asyncio.gather(*(inbox.add(m) for m in messages[:n]))
        concurrent_s = time.perf_counter() - t0
        commits, writes = db.commits, db.writes
        t0 = time.perf_counter()
        for m in messages[n:]:
            await inbox.add(m)  # one at a time: each waits for its own COMMIT
        serial_s = time.perf_counter() - t0
    finally:
        await db.close()
    assert all(added), "every message is new"
    return {
        "adds": n,
        "concurrent_s": concurrent_s,
        "adds_per_s": n / concurrent_s,
        "commits": commits,
        "writes": writes,
        "writes_per_commit": writes / commits,
        "serial_adds": serial,
        "serial_adds_per_s": serial / serial_s if serial else math.nan,
        "serial_commit_ms": serial_s / serial * 1e3 if serial else math.nan,
    }


async def profile_fast(args: argparse.Namespace, workdir: Path, out: Path) -> dict[str, Any]:
    """The fast scenario once more, with the gateway under pyinstrument (not measured: sampling
    slows it down); returns :func:`_common.profile_summary` and keeps ``out.txt``/``out.pstats``."""
    text = "hello from the benchmark"
    async with Gateway(
        delay=0, slots=args.slots, log_level=args.log_level, workdir=workdir, profile=out
    ) as gateway:
        await drive(gateway.base, 10**9, args.warmup, args.concurrency, text)
        assert gateway.process is not None
        profiling(gateway.process.pid)
        await drive(gateway.base, 0, args.messages, args.concurrency, text)
        profiling(gateway.process.pid)
        written = await profile_written(out)
    return profile_summary(written)


async def run_once(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="imgateway-bench-") as tmp:
        root = Path(tmp)
        run: dict[str, Any] = {}
        # Every scenario is bounded: a hung gateway fails the run instead of blocking it.
        async with asyncio.timeout(args.timeout):
            run["fast"] = await scenario_fast(args, root / "fast")
        if args.slow_messages:
            async with asyncio.timeout(args.timeout):
                run["slow"] = await scenario_slow(args, root / "slow")
        if args.inbox_adds:
            async with asyncio.timeout(args.timeout):
                run["inbox"] = await scenario_inbox(args, root)
        return run


# -- reporting ------------------------------------------------------------------------------------


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The same structure as one run, every number the median over the runs."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: median_of([run[key] for run in runs]) for key in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(runs)
    return first


def print_report(summary: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    k = len(runs)
    label = f"median of {k} runs" if k > 1 else "1 run"
    fast = summary["fast"]
    print(
        f"\nfast: {fast['messages']} messages, {fast['concurrency']} in flight, "
        f"agent delay 0, {fast['slots']} slots ({label})"
    )
    print(f"  {'latency':<10}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}   (ms after the send)")
    for name in ("ack", "thinking", "final"):
        row = fast[name]
        print(
            f"  {name:<10}{row['p50_ms']:9.1f}{row['p90_ms']:9.1f}"
            f"{row['p99_ms']:9.1f}{row['max_ms']:9.1f}"
        )
    spread = [run["fast"]["msgs_per_s"] for run in runs]
    print(
        f"  throughput {fast['msgs_per_s']:.0f} msg/s (runs: {', '.join(f'{s:.0f}' for s in spread)})"
        f"; wall {fast['wall_s']:.2f} s"
    )
    print(
        f"  CPU during the run: gateway {fast['gateway_cpu_s']:.2f} s, "
        f"client {fast['client_cpu_s']:.2f} s (of {fast['wall_s']:.2f} s wall, {os.cpu_count()} cores)"
    )
    if "slow" in summary:
        slow = summary["slow"]
        print(
            f"\nslow: {slow['messages']} messages x {slow['agent_time_s']:.2f} s of agent time, "
            f"{slow['concurrency']} in flight, {slow['slots']} slots ({label})"
        )
        print(
            f"  makespan {slow['makespan_s']:.2f} s; serial bound {slow['serial_bound_s']:.1f} s "
            f"(speed-up {slow['speedup_vs_serial']:.0f}x); slot bound {slow['slot_bound_s']:.2f} s"
        )
        print(
            f"  ack p50 {slow['ack']['p50_ms']:.1f} ms, p99 {slow['ack']['p99_ms']:.1f} ms; "
            f"final p50 {slow['final']['p50_ms']:.0f} ms, max {slow['final']['max_ms']:.0f} ms"
        )
    if "inbox" in summary:
        inbox = summary["inbox"]
        print(f"\ninbox: {inbox['adds']} concurrent Inbox.add ({label})")
        print(
            f"  {inbox['adds_per_s']:.0f} adds/s in {inbox['concurrent_s'] * 1e3:.0f} ms; "
            f"{inbox['writes']:.0f} writes in {inbox['commits']:.0f} commits "
            f"({inbox['writes_per_commit']:.0f} writes per commit)"
        )
        if inbox["serial_adds"]:
            print(
                f"  sequential: {inbox['serial_adds_per_s']:.0f} adds/s "
                f"({inbox['serial_commit_ms']:.2f} ms per add, one commit each)"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=2000, help="fast scenario: messages (2000)")
    p.add_argument("--concurrency", type=int, default=64, help="fast scenario: in flight (64)")
    p.add_argument("--json", type=Path, help="write the summary (and every run) here")
    p.add_argument("--repeat", type=int, default=1, help="runs; the report is their median (1)")
    p.add_argument("--warmup", type=int, default=100, help="unmeasured messages first (100)")
    p.add_argument("--slots", type=int, default=64, help="[conversation] concurrency (64)")
    p.add_argument("--slow-messages", type=int, default=200, help="slow scenario; 0 skips (200)")
    p.add_argument("--slow-concurrency", type=int, default=200, help="slow scenario (200)")
    p.add_argument("--inbox-adds", type=int, default=None, help="inbox scenario (--messages)")
    p.add_argument("--inbox-serial", type=int, default=200, help="sequential adds after (200)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per scenario (300)")
    args = p.parse_args(argv)
    if args.inbox_adds is None:
        args.inbox_adds = args.messages
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = []
    for k in range(args.repeat):
        print(f"run {k + 1}/{args.repeat} ...", file=sys.stderr, flush=True)
        runs.append(asyncio.run(run_once(args)))
    summary = median_of(runs)
    print_report(summary, runs)
    if args.json:
        info = meta()
        info["loadavg_after"] = info.pop("loadavg")  # taken after the runs; stays the last key
        args.json.write_text(
            json.dumps({"meta": info, "median": summary, "runs": runs}, indent=2) + "\n"
        )
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
