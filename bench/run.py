"""Every benchmark in one command: the gateway against the DingTalk emulator, side by side with the
baselines, plus the core alone through echo, a profile, and a chart.

    python bench/run.py [--quick] [--only burst,slow,...] [--repeat K] [--out DIR]

Scenarios (bench/README.md has what each measures and the recorded figures):

* ``burst``: N messages at once, instant agent: gateway, floor, AsyncChatbotHandler, reference.
* ``steady``: the same messages at 200 per second: the ACK latency below saturation.
* ``slow``: N messages, each answer takes 1 s: the makespans.
* ``streaming``: one answer of 500 chunks over 10 s: what the user sees.
* ``quota``: 50 such answers at once with the emulator enforcing 20 requests/s per app and API.
* ``scale``: 1, 10, 50 DingTalk instances in one gateway: start-up, memory, idle CPU.
* ``core``: bench/core_echo.py (echo driver + echo agent) once.
* ``profile``: the DingTalk burst and the core echo run again with the gateway under
  pyinstrument; where its time goes.

Each scenario prints a table and writes ``OUT/DATE[-quick]-SCENARIO.json``; the chart goes to
``OUT/DATE[-quick]-bench.png``.  Exit code 1 if a message was lost, duplicated or not acknowledged
in any run (the benchmark goes on with the other scenarios first).  Not a test: no timing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _chart
import _dingtalk as dt
import attrs
import core_echo
from _common import RESULTS, OtherLoad, meta, profile_summary, table, write_json
from _dingtalk import System

SCENARIOS = ("burst", "steady", "slow", "streaming", "quota", "scale", "core", "profile")
TEXT = "hello from the benchmark"


@attrs.frozen
class Sizes:
    burst: int
    repeat: int
    steady: int
    steady_rate: float
    slow: int
    chunks: int
    chunk_seconds: float
    conversations: int
    instances: tuple[int, ...]
    idle: float
    core: int


FULL = Sizes(2000, 3, 2000, 200.0, 200, 500, 10.0, 50, (1, 10, 50), 10.0, 2000)
QUICK = Sizes(500, 1, 200, 200.0, 20, 100, 2.0, 20, (1, 10), 3.0, 500)

REFERENCE = "reference design"
THREADPOOL = "AsyncChatbotHandler"


def burst_systems(default_pacing: bool = False) -> list[System]:
    # The gateway: the production settings except what the scenario takes out of the way (rate,
    # pacing: an instant answer would otherwise wait update_interval before its final card, see
    # the README) and 64 turns at once.  ``default_pacing`` adds it with the pacing defaults.
    systems = [
        System("gateway", "gateway", "instant", slots=64),
        System("floor", "floor", "instant"),
        System(f"{THREADPOOL}(8)", "threadpool", "instant"),
        System(REFERENCE, "reference", "instant"),
    ]
    if default_pacing:
        systems.append(
            attrs.evolve(paced_gateway(1e6), label="gateway, default pacing", agent="instant")
        )
    return systems


def slow_systems() -> list[System]:
    return [
        System("gateway", "gateway", "sleep", slots=256),
        System("gateway, sync agent", "gateway", "sleep-sync", slots=256),
        System("floor", "floor", "sleep"),
        System(f"{THREADPOOL}(8)", "threadpool", "sleep"),
        System(REFERENCE, "reference", "sleep"),
    ]


def paced_gateway(rate: float) -> System:
    """The gateway with the production pacing: [reply] update_interval 1 s, card_update_interval
    0.8 s (the defaults), 64 turns at once."""
    return System(
        "gateway", "gateway", "chunks", slots=64, rate=rate, update_interval=1.0, card_interval=0.8
    )


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        self.stamp = time.strftime("%Y-%m-%d") + ("-quick" if args.quick else "")
        self.results: dict[str, Any] = {}
        self.problems: list[str] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="imgateway-bench-"))
        self._count = 0

    def workdir(self, label: str) -> Path:
        self._count += 1
        return self.tmp / f"{self._count:03d}-{label.split()[0].strip(',')}"

    def check(self, scenario: str, result: dict[str, Any], *, finding: bool = False) -> None:
        """Loud, not fatal: the other scenarios still run, the exit code says it.  ``finding``:
        losses are what the scenario shows about a baseline (under the quota), not a broken run."""
        bad = {k: result.get(k, 0) for k in ("lost", "duplicated", "unacked") if result.get(k, 0)}
        if bad:
            line = f"!!! {scenario} / {result.get('system')}: {bad}"
            print(line + (" (a finding about this baseline)" if finding else ""), flush=True)
            if not finding:
                self.problems.append(line)

    def save(self, scenario: str, data: Any, text: str, load: OtherLoad) -> None:
        others = load.cores()
        text += f"\n  (other processes kept {others:.2f} of {os.cpu_count()} cores busy meanwhile)"
        print("\n" + text + "\n", flush=True)
        self.results[scenario] = data
        path = write_json(
            self.args.out / f"{self.stamp}-{scenario}.json",
            {"meta": {**meta(), "other_cores_busy": others}, scenario: data},
        )
        print(f"wrote {path}", flush=True)

    # -- scenarios -------------------------------------------------------------------------------

    async def burst(self, load: OtherLoad) -> None:
        n, repeat = self.sizes.burst, self.args.repeat or self.sizes.repeat
        systems = burst_systems(self.args.default_pacing)
        runs: dict[str, list[dict[str, Any]]] = {s.label: [] for s in systems}
        for k in range(repeat):
            for system in systems:
                log(f"burst {k + 1}/{repeat}: {system.label}, {n} messages")
                result = await dt.answer_all(
                    system, self.workdir(system.label), n, TEXT, warmup=20, timeout=300.0
                )
                self.check("burst", result)
                runs[system.label].append(result)
        gateway = median(runs["gateway"], "msgs_per_s")
        rows = []
        for label, results in runs.items():
            rate = median(results, "msgs_per_s")
            rows.append(
                [
                    label,
                    rate,
                    spread(results, "msgs_per_s"),
                    gateway / rate,
                    *(
                        median(results, name, pct)
                        for name in ("ack", "thinking", "final")
                        for pct in ("p50_ms", "p99_ms")
                    ),
                    median(results, "card_calls_per_message"),
                    sum(r["lost"] + r["duplicated"] + r["unacked"] for r in results),
                    median(results, "cpu_child_s"),
                ]
            )
        floor = median(runs["floor"], "msgs_per_s")
        text = table(
            f"burst: {n} messages at once, 1 per conversation, instant agent; median of {repeat} "
            "(latencies in ms after the push)",
            [
                "system",
                "msg/s",
                "range",
                "gw/this",
                "ack p50",
                "ack p99",
                "think p50",
                "think p99",
                "final p50",
                "final p99",
                "calls/msg",
                "lost+dup",
                "CPU s",
            ],
            rows,
        )
        ack99 = median(runs["gateway"], "ack", "p99_ms")
        text += (
            f"\n  targets: gateway/floor = {gateway / floor:.2f} (>= 0.8: "
            f"{'met' if gateway / floor >= 0.8 else 'NOT met'}); gateway ACK p99 = {ack99:.0f} ms "
            f"(< 50 ms: {'met' if ack99 < 50 else 'NOT met'})"
        )
        self.save("burst", runs, text, load)

    async def steady(self, load: OtherLoad) -> None:
        """The burst's messages at a steady rate below every system's capacity: the ACK latency
        a platform sees in normal operation, without the queueing of an instant burst."""
        n, rate = self.sizes.steady, self.sizes.steady_rate
        results = []
        for system in burst_systems(self.args.default_pacing):
            log(f"steady: {system.label}, {n} messages at {rate:g}/s")
            result = await dt.answer_all(
                system, self.workdir(system.label), n, TEXT, warmup=20, timeout=300.0, rate=rate
            )
            self.check("steady", result)
            results.append(result)
        rows = [
            [
                r["system"],
                r["msgs_per_s"],
                *(
                    r[name][pct]
                    for name in ("ack", "thinking", "final")
                    for pct in ("p50_ms", "p99_ms")
                ),
                r["ack"]["max_ms"],
                r["cpu_child_s"] / r["wall_s"],
                r["lost"] + r["duplicated"] + r["unacked"],
            ]
            for r in results
        ]
        text = table(
            f"steady: {n} messages at {rate:g}/s, 1 per conversation, instant agent (ms after the push)",
            [
                "system",
                "msg/s",
                "ack p50",
                "ack p99",
                "think p50",
                "think p99",
                "final p50",
                "final p99",
                "ack max",
                "CPU cores",
                "lost+dup",
            ],
            rows,
        )
        ack99 = results[0]["ack"]["p99_ms"]
        text += f"\n  gateway ACK p99 at {rate:g}/s = {ack99:.0f} ms (< 50 ms: {'met' if ack99 < 50 else 'NOT met'})"
        self.save("steady", results, text, load)

    async def slow(self, load: OtherLoad) -> None:
        n = self.sizes.slow
        results = []
        for system in slow_systems():
            log(f"slow: {system.label}, {n} messages x 1 s")
            result = await dt.answer_all(
                system, self.workdir(system.label), n, TEXT, warmup=2, timeout=n * 1.5 + 60
            )
            self.check("slow", result)
            results.append(result)
        rows = [
            [
                r["system"],
                r["wall_s"],
                r["wall_s"] / 1.0,
                r["final"]["p50_ms"] / 1e3,
                r["final"]["max_ms"] / 1e3,
                r["ack"]["p99_ms"],
                r["lost"] + r["duplicated"] + r["unacked"],
            ]
            for r in results
        ]
        text = table(
            f"slow agent: {n} messages at once, each answer takes 1 s",
            [
                "system",
                "makespan s",
                "x agent latency",
                "final p50 s",
                "final max s",
                "ack p99 ms",
                "lost+dup",
            ],
            rows,
        )
        gateway = results[0]["wall_s"]
        text += (
            f"\n  target: gateway makespan within 1.5 x 1 s: {gateway:.2f} s "
            f"({'met' if gateway <= 1.5 else 'NOT met'}); reference design serial bound {n} s"
        )
        self.save("slow", results, text, load)

    async def streaming(self, load: OtherLoad) -> None:
        s = self.sizes
        systems = [
            paced_gateway(rate=1e6),
            System(REFERENCE, "reference", "chunks"),
            System(f"{THREADPOOL}(8)", "threadpool", "chunks"),
        ]
        results = []
        for system in systems:
            log(f"streaming: {system.label}, {s.chunks} chunks over {s.chunk_seconds} s")
            result = await dt.streaming(
                system, self.workdir(system.label), s.chunks, s.chunk_seconds
            )
            self.check("streaming", result)
            results.append(result)
        rows = [
            [
                r["system"],
                r.get("card_updates", math.nan),
                r.get("longest_gap_s", math.nan),
                r.get("last_chunk_to_final_s", math.nan) * 1e3,
                r.get("thinking_to_final_s", math.nan),
            ]
            for r in results
        ]
        text = table(
            f"streaming: one answer of {s.chunks} chunks over {s.chunk_seconds:g} s "
            "(gateway: default pacing, update_interval 1 s, card_update_interval 0.8 s)",
            ["system", "card updates", "longest gap s", "last chunk->final ms", "card open s"],
            rows,
        )
        self.save("streaming", results, text, load)

    async def quota(self, load: OtherLoad) -> None:
        s = self.sizes
        systems = [
            paced_gateway(rate=20.0),
            System(
                f"{THREADPOOL}({s.conversations})", "threadpool", "chunks", workers=s.conversations
            ),
        ]
        results = []
        for system in systems:
            log(f"quota: {system.label}, {s.conversations} answers, emulator at 20 calls/s")
            result = await dt.quota(
                system, self.workdir(system.label), s.conversations, s.chunks, s.chunk_seconds, 20
            )
            self.check("quota", result, finding=system.kind != "gateway")
            results.append(result)
        rows = [
            [
                r["system"],
                r["completion_s"],
                f"{r['answered']}/{r['conversations']}",
                r["card_calls"],
                r["rejected"],
                r["rejected_per_s_mean"],
                r["rejected_per_s_peak"],
                r["longest_gap"]["p50_ms"] / 1e3,
                r["longest_gap"]["max_ms"] / 1e3,
                r["last_chunk_to_final"]["p50_ms"],
                r["last_chunk_to_final"]["max_ms"],
            ]
            for r in results
        ]
        text = table(
            f"quota: {s.conversations} answers of {s.chunks} chunks over {s.chunk_seconds:g} s at "
            "once; emulator limit 20 calls/s per app and API (403 QpsLimit beyond); gateway rate "
            "20; gap: the longest a finished card stood still; last->final: from the agent's last "
            "chunk to the final card (over the finished cards)",
            [
                "system",
                "completion s",
                "finished",
                "card calls",
                "403s",
                "403/s mean",
                "403/s peak",
                "gap p50 s",
                "gap max s",
                "last->final p50 ms",
                "last->final max ms",
            ],
            rows,
        )
        text += f"\n  ({REFERENCE}: serial, so {s.conversations} x {s.chunk_seconds:g} s; not run)"
        self.save("quota", results, text, load)

    async def scale(self, load: OtherLoad) -> None:
        results = []
        for count in self.sizes.instances:
            log(f"scale: {count} DingTalk instances, {self.sizes.idle:g} s idle")
            results.append(await dt.scale(self.workdir(f"scale{count}"), count, self.sizes.idle))
        rows = [
            [
                r["instances"],
                r["startup_s"],
                r["rss_mb"],
                r["rss_mb_after_idle"],
                r["idle_cpu_percent"],
            ]
            for r in results
        ]
        text = table(
            "scale: DingTalk instances in one gateway process (each its own app)",
            ["instances", "start-up s", "RSS MiB", "RSS after idle", "idle CPU %"],
            rows,
        )
        worst = results[-1]
        text += (
            f"\n  target: {worst['instances']} instances under 200 MB: {worst['rss_mb']:.0f} MiB "
            f"({'met' if worst['rss_mb'] * 1.048576 < 200 else 'NOT met'})"
        )
        self.save("scale", results, text, load)

    async def core(self, load: OtherLoad) -> None:
        log(f"core: echo driver + echo agent, {self.sizes.core} messages")
        args = core_echo.parse_args(
            ["--messages", str(self.sizes.core), "--slow-messages", "0", "--inbox-adds", "0"]
        )
        result = await core_echo.run_once(args)
        fast = result["fast"]
        text = table(
            f"core alone: {fast['messages']} messages through echo's HTTP endpoint, "
            f"{fast['concurrency']} in flight, echo agent without delay",
            ["", "msg/s", "ack p50", "ack p99", "final p50", "final p99", "gateway CPU s"],
            [
                [
                    "gateway + echo",
                    fast["msgs_per_s"],
                    fast["ack"]["p50_ms"],
                    fast["ack"]["p99_ms"],
                    fast["final"]["p50_ms"],
                    fast["final"]["p99_ms"],
                    fast["gateway_cpu_s"],
                ]
            ],
        )
        self.save("core", result, text, load)

    async def profile(self, load: OtherLoad) -> None:
        """Not measured: the profiler slows the gateway down."""
        out = self.args.out / f"{self.stamp}-profile"
        log(f"profile: DingTalk burst of {self.sizes.burst} with the gateway under pyinstrument")
        system = burst_systems()[0]
        result = await dt.answer_all(
            system,
            self.workdir("profile"),
            self.sizes.burst,
            TEXT,
            warmup=20,
            timeout=300.0,
            profile=Path(f"{out}-dingtalk"),
        )
        self.check("profile", result)
        summaries = {"dingtalk": profile_summary(Path(f"{out}-dingtalk.pstats"))}
        log(f"profile: core echo, {self.sizes.core} messages, gateway under pyinstrument")
        args = core_echo.parse_args(["--messages", str(self.sizes.core)])
        summaries["echo"] = await core_echo.profile_fast(
            args, self.workdir("profile-echo"), Path(f"{out}-echo")
        )
        texts = []
        for name, summary in summaries.items():
            texts.append(
                table(
                    f"profile, {name}: gateway's main thread, {summary['sampled_s']:.1f} s sampled",
                    ["area", "% of samples"],
                    summary["areas_percent"].items(),
                )
            )
            texts.append(
                table(
                    f"profile, {name}: top functions by own time",
                    ["function", "own %", "cumulative %"],
                    (
                        [f["function"], f["own_percent"], f["cumulative_percent"]]
                        for f in summary["top_own"]
                    ),
                )
            )
        self.save("profile", summaries, "\n\n".join(texts), load)


def median(results: Sequence[dict[str, Any]], *keys: str) -> float:
    return statistics.median(_dig(r, keys) for r in results)


def spread(results: Sequence[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in results]
    return f"{min(values):.0f}-{max(values):.0f}" if len(values) > 1 else "-"


def _dig(result: dict[str, Any], keys: Sequence[str]) -> float:
    value: Any = result
    for key in keys:
        value = value[key]
    return float(value)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes: about 1.5 minutes")
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    p.add_argument("--repeat", type=int, default=0, help="burst runs (full 3, quick 1)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where JSON and PNG go")
    p.add_argument(
        "--default-pacing",
        action="store_true",
        help="burst, steady: also the gateway with the default update_interval/card pacing",
    )
    args = p.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    return args


async def run(args: argparse.Namespace) -> int:
    runner = Runner(args)
    steps: dict[str, Callable[[], Any]] = {name: getattr(runner, name) for name in SCENARIOS}
    started = time.monotonic()
    try:
        for name in args.only:
            await steps[name](OtherLoad())
    finally:
        shutil.rmtree(runner.tmp, ignore_errors=True)
    if runner.results:
        chart = _chart.draw(runner.results, args.out / f"{runner.stamp}-bench.png")
        if chart:
            print(f"wrote {chart}")
    log(f"done in {time.monotonic() - started:.0f} s")
    for line in runner.problems:
        print(line)
    return 1 if runner.problems else 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: every child is stopped, the temp dir removed


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    return asyncio.run(run(parse_args()))


if __name__ == "__main__":
    sys.exit(main())
