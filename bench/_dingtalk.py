"""The DingTalk scenarios: the gateway and the baselines against the emulator, one system at a time.

The emulator (``gateway_dingtalk.emulator``) runs in the benchmark's own process on 127.0.0.1; the
system under test is a child process: the real ``gateway run`` with a ``dingtalk-stream`` instance,
or one of the baselines of ``_clients.py``.  Each system gets a fresh emulator, so the records read
afterwards are its own.  All timings come from the emulator's records, on one clock
(``time.monotonic()``, which is system-wide on Linux, so the agents' timestamps compare too):

* push: when the emulator sent the robot message (``AckRecord.time - latency``);
* ack: ``AckRecord.latency``, from the push to the ack frame read by the emulator;
* thinking: the card's creation (``createAndDeliver`` handled);
* final: the ``streaming`` call with ``isFinalize`` handled.

Every message comes from its own sender in its own 1:1 chat, and each client answers in the
``IM_ROBOT`` space of that sender, so a card is matched to its message by the space whatever the
card id scheme.  A message without a finalised card is *lost*, a second card for one message is a
*duplicate*; both are reported loudly (see :func:`outcomes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
from _common import (
    BENCH,
    Children,
    child_env,
    cpu_seconds,
    percentiles,
    profile_written,
    profiling,
    rss_mb,
)

from gateway_dingtalk.emulator import CardState, DingTalkEmulator
from gateway_testkit.dingtalk import TEMPLATE_VARIABLES

SECRET = "bench-secret"
TEMPLATE = "imgateway.bench.schema"
#: the gateway's variables (content, feedback, labels...) and the SDK's AI card status
VARIABLES = (*TEMPLATE_VARIABLES, "flowStatus")
SPACE = "dtv1.card//IM_ROBOT."

GATEWAY_TOML = """\
state_dir = "state"
shutdown_grace = 2.0

[http]
enabled = false
"""

INSTANCE_TOML = """\
type = "dingtalk-stream"

[settings]
client_id = "{app}"
client_secret = "{secret}"
endpoint = "{endpoint}"
card_template_id = "{template}"
card_update_interval = {card_interval}
rate = {rate}

[agent]
{agent}

[reply]
update_interval = {update_interval}
feedback = false

[conversation]
concurrency = {slots}
"""

#: The agent tables of the gateway, by agent kind (the baselines' twins are in _agents.py).
AGENTS = {
    "instant": 'type = "echo"\ndelay = 0',
    "sleep": 'type = "python"\ncallable = "_agents:sleep_async"',
    "sleep-sync": 'type = "python"\ncallable = "_agents:sleep_sync"',
    "chunks": 'type = "python"\ncallable = "_agents:chunks"',
}


@attrs.frozen
class System:
    """One system under test: ``gateway`` or a ``_clients.py`` mode, with its knobs."""

    label: str
    kind: str  # "gateway" | "reference" | "threadpool" | "floor"
    agent: str  # a key of AGENTS ("sleep-sync" only for the gateway)
    slots: int = 64  # gateway: [conversation] concurrency
    workers: int = 8  # threadpool: max_workers (the SDK's default)
    rate: float = 1e6  # gateway: OpenAPI requests/s per app ("out of the way" unless the quota run)
    card_interval: float = 0.0  # gateway: card_update_interval
    update_interval: float = 0.0  # gateway: [reply] update_interval

    def instance_toml(self, app: str, endpoint: str) -> str:
        return INSTANCE_TOML.format(
            app=app,
            secret=SECRET,
            endpoint=endpoint,
            template=TEMPLATE,
            card_interval=self.card_interval,
            update_interval=self.update_interval,
            rate=self.rate,
            agent=AGENTS[self.agent],
            slots=self.slots,
        )


@attrs.define
class Run:
    emu: DingTalkEmulator
    apps: list[str]
    child: Any
    #: seconds from starting the child to every app connected
    startup_s: float


@contextlib.asynccontextmanager
async def running(
    system: System,
    workdir: Path,
    *,
    apps: int = 1,
    profile: Path | None = None,
    **emulator_options: Any,
) -> AsyncIterator[Run]:
    """A fresh emulator with ``apps`` apps and ``system`` connected to all of them.  The emulator
    and the child are stopped on the way out, whatever happens."""
    names = [f"dingbench{i}" for i in range(apps)]
    # No redelivery: a late ACK is measured, not answered twice (the count of late ACKs says what
    # DingTalk would have redelivered).
    emulator_options.setdefault("ack_timeout", None)
    emu = DingTalkEmulator(
        {name: SECRET for name in names}, templates={TEMPLATE: VARIABLES}, **emulator_options
    )
    await emu.start()
    os.makedirs(workdir)
    try:
        with Children(workdir / "logs") as children:
            started = time.monotonic()
            child = start(system, children, workdir, emu, names, profile)
            try:
                for name in names:
                    await emu.wait_connected(name, timeout=60.0)
            except TimeoutError:
                raise RuntimeError(
                    f"{system.label} did not connect: {children.stderr(system.kind)}"
                ) from None
            yield Run(emu, names, child, time.monotonic() - started)
            if child.poll() is not None:
                raise RuntimeError(f"{system.label} died: {children.stderr(system.kind)}")
    finally:
        await emu.close()


def start(
    system: System,
    children: Children,
    workdir: Path,
    emu: DingTalkEmulator,
    apps: Sequence[str],
    profile: Path | None,
) -> Any:
    if system.kind == "gateway":
        (workdir / "instances").mkdir()
        for i, app in enumerate(apps):
            (workdir / "instances" / f"bot{i}.toml").write_text(system.instance_toml(app, emu.url))
        (workdir / "gateway.toml").write_text(GATEWAY_TOML)
        return children.gateway(workdir, name="gateway", env=child_env(profile))
    (app,) = apps
    argv = [
        sys.executable,
        str(BENCH / "_clients.py"),
        system.kind,
        *("--endpoint", emu.url, "--app", app, "--secret", SECRET, "--template", TEMPLATE),
        *("--agent", system.agent, "--workers", str(system.workers)),
    ]
    return children.start(argv, name=system.kind, cwd=workdir, env=child_env(profile))


# -- pushing and reading back ---------------------------------------------------------------------


async def push(
    emu: DingTalkEmulator,
    app: str,
    senders: Sequence[str],
    text: str,
    rate: float | None = None,
) -> dict[str, str]:
    """Push one message per sender; returns sender -> msgId.  With ``rate``, at that many messages
    per second; without, as fast as the emulator can, letting its loop read the ACKs every 50
    pushes (else the burst would delay the very ACKs it measures)."""
    sent: dict[str, str] = {}
    started = time.monotonic()
    for i, sender in enumerate(senders):
        if rate:
            await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
        elif i % 50 == 49:
            await asyncio.sleep(0)
        message = await emu.send_message(app, text, sender_staff_id=sender, redeliver=False)
        sent[sender] = message.msg_id
    return sent


def cards_by_sender(emu: DingTalkEmulator) -> dict[str, list[CardState]]:
    found: dict[str, list[CardState]] = {}
    for card in emu.cards.values():
        for space in card.spaces:
            if space.startswith(SPACE):
                found.setdefault(space[len(SPACE) :], []).append(card)
    return found


def final_time(card: CardState) -> float | None:
    return next((u.time for u in card.history if u.is_finalize and not u.is_error), None)


async def wait_answered(
    emu: DingTalkEmulator,
    senders: Sequence[str],
    timeout: float,
    child: Any,
    quiet: float = 10.0,
) -> None:
    """Until every sender has a finished card, the child died, ``timeout`` s passed, or the
    client made no HTTP call for ``quiet`` s (it gave up: the rest is lost).  Polls cheaply every
    50 ms instead of ``emu.wait_until``, which would re-check on every call."""
    wanted = set(senders)
    deadline = time.monotonic() + timeout
    calls, last_change = len(emu.calls), time.monotonic()
    while time.monotonic() < deadline and child.poll() is None:
        found = cards_by_sender(emu)
        if all(any(c.status == "finished" for c in found.get(s, ())) for s in wanted):
            return
        if len(emu.calls) != calls:
            calls, last_change = len(emu.calls), time.monotonic()
        elif time.monotonic() - last_change > quiet:
            return
        await asyncio.sleep(0.05)


def outcomes(emu: DingTalkEmulator, sent: dict[str, str]) -> dict[str, Any]:
    """Per-message timings (seconds after the push) and the counts of what went wrong: unacked,
    lost (no finished card), duplicated (more than one card for one message)."""
    acks = {ack.msg_id: ack for ack in emu.acks if ack.frame_type == "CALLBACK"}
    cards = cards_by_sender(emu)
    rows: list[dict[str, float]] = []
    lost = duplicated = unacked = 0
    for sender, msg_id in sent.items():
        mine = cards.get(sender, [])
        duplicated += max(0, len(mine) - 1)
        final = next((t for t in map(final_time, mine) if t is not None), None)
        lost += final is None
        ack = acks.get(msg_id)
        if ack is None:
            unacked += 1
            continue
        pushed = ack.time - ack.latency
        rows.append(
            {
                "push": pushed,
                "ack": ack.latency,
                "thinking": min(c.created_at for c in mine) - pushed if mine else math.nan,
                "final": final - pushed if final is not None else math.nan,
            }
        )
    return {"rows": rows, "lost": lost, "duplicated": duplicated, "unacked": unacked}


# -- the scenarios ---------------------------------------------------------------------------------


async def answer_all(
    system: System,
    workdir: Path,
    n: int,
    text: str,
    *,
    warmup: int,
    timeout: float,
    rate: float | None = None,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Push ``n`` messages at once, or at ``rate`` per second (after ``warmup`` unmeasured ones),
    and wait for every final card: the burst, steady and slow-agent scenarios."""
    async with running(system, workdir, profile=profile) as run:
        emu, (app,) = run.emu, run.apps
        if warmup:
            # Opens the clients' keep-alive connections and fetches the token, not measured.
            senders = [f"warm{i}" for i in range(warmup)]
            await push(emu, app, senders, text)
            await wait_answered(emu, senders, timeout, run.child)
        senders = [f"u{i}" for i in range(n)]
        calls_before = len(emu.calls)
        cpu_child, cpu_bench = cpu_seconds(run.child.pid), time.process_time()
        if profile:
            profiling(run.child.pid)
        pushing = time.monotonic()
        sent = await push(emu, app, senders, text, rate)
        push_s = time.monotonic() - pushing
        await wait_answered(emu, senders, timeout, run.child)
        cpu_child = cpu_seconds(run.child.pid) - cpu_child
        if profile:
            profiling(run.child.pid)
            await profile_written(profile)
        cpu_bench = time.process_time() - cpu_bench
        result = outcomes(emu, sent)
        card_calls = [c for c in emu.calls[calls_before:] if c.path.startswith("/v1.0/card/")]
    rows = result.pop("rows")
    finals = [r["push"] + r["final"] for r in rows if not math.isnan(r["final"])]
    start = min(r["push"] for r in rows) if rows else math.nan
    end = max(finals) if finals else math.nan
    wall = end - start
    return {
        "system": system.label,
        "messages": n,
        **result,
        "answered": len(finals),
        "push_s": push_s,
        "wall_s": wall,
        "msgs_per_s": len(finals) / wall if finals else 0.0,
        "ack": percentiles(r["ack"] for r in rows),
        "thinking": percentiles(r["thinking"] for r in rows if not math.isnan(r["thinking"])),
        "final": percentiles(r["final"] for r in rows if not math.isnan(r["final"])),
        # DingTalk re-pushes an un-ACKed robot message after some seconds (research doc §1.5):
        # with redelivery on, these would have been answered twice.
        "acks_over_3s": sum(r["ack"] > 3.0 for r in rows),
        "card_calls_per_message": len(card_calls) / n,
        "card_errors": sum(c.status != 200 for c in card_calls),
        "cpu_child_s": cpu_child,
        "cpu_bench_s": cpu_bench,
        # Per-message seconds for the chart, to the microsecond (more digits would be noise).
        "samples": {k: [round(r[k], 6) for r in rows] for k in ("ack", "thinking", "final")},
    }


def last_chunk_at(text: str) -> float:
    """The agents stamp their last chunk with ``@<time.monotonic()>``."""
    _, _, stamp = text.rpartition("@")
    try:
        return float(stamp)
    except ValueError:
        return math.nan


def seen(card: CardState) -> dict[str, Any] | None:
    """What the user saw of a finished streamed card: its visible changes (the thinking card,
    each streaming update the platform accepted, the final text), the longest gap between two of
    them and the time from the agent's last chunk to the final card; None if it never finished."""
    final = final_time(card)
    if final is None:
        return None
    updates = [u for u in card.history if u.source == "streaming" and not u.is_finalize]
    visible = [card.created_at, *(u.time for u in updates), final]
    return {
        "card_updates": len(updates),
        "longest_gap_s": max(b - a for a, b in itertools.pairwise(visible)),
        "last_chunk_to_final_s": final - last_chunk_at(card.content.get("content", "")),
        "thinking_to_final_s": final - card.created_at,
        "update_times": [t - card.created_at for t in visible],
    }


async def streaming(system: System, workdir: Path, chunks: int, seconds: float) -> dict[str, Any]:
    """One long streamed answer: what a user sees of it."""
    async with running(system, workdir) as run:
        emu, (app,) = run.emu, run.apps
        sent = await push(emu, app, ["u0"], f"chunks {chunks} {seconds}")
        await wait_answered(emu, list(sent), seconds * 3 + 30, run.child, quiet=seconds + 10)
        cards = cards_by_sender(emu).get("u0", [])
    view = seen(cards[0]) if len(cards) == 1 else None
    if view is None:
        return {"system": system.label, "lost": 1, "duplicated": max(0, len(cards) - 1)}
    return {"system": system.label, "lost": 0, "duplicated": 0, **view}


async def quota(
    system: System, workdir: Path, conversations: int, chunks: int, seconds: float, qps: float
) -> dict[str, Any]:
    """``conversations`` streamed answers at once while the emulator enforces ``qps`` calls per
    second per app and API (403 ``QpsLimit`` beyond)."""
    async with running(system, workdir, qps_limit=qps) as run:
        emu, (app,) = run.emu, run.apps
        started, started_wall = time.monotonic(), time.time()
        senders = [f"u{i}" for i in range(conversations)]
        sent = await push(emu, app, senders, f"chunks {chunks} {seconds}")
        # A client may stay silent for most of an answer before its final call (the SDK baseline
        # spends its 19 updates in the first 2 s, then nothing until the end): "no call for a
        # while" means "gave up" only after longer than an answer takes.  (With 5 s, the first
        # recorded run closed the emulator before any final card of the baseline.)
        await wait_answered(emu, senders, seconds * 12 + 60, run.child, quiet=seconds + 10)
        # The active period: to the last call the client made (not the quiet wait after it).
        active = max(1e-9, emu.calls[-1].time - started)
        result = outcomes(emu, sent)
        rejected = sum(emu.rejections.values())
        seconds_active = range(int(started_wall), int(started_wall + active) + 1)
        per_second = [emu.rejections.get(s, 0) for s in seconds_active]
        card_calls = sum(c.path.startswith("/v1.0/card/") for c in emu.calls)
        views = [v for cards in cards_by_sender(emu).values() for v in map(seen, cards) if v]
    rows = result.pop("rows")
    finals = [r["push"] + r["final"] for r in rows if not math.isnan(r["final"])]
    start = min(r["push"] for r in rows) if rows else math.nan
    return {
        "system": system.label,
        "conversations": conversations,
        **result,
        "answered": len(finals),
        "completion_s": (max(finals) - start) if finals else math.nan,
        "card_calls": card_calls,
        "rejected": rejected,
        "active_s": active,
        "rejected_per_s_mean": rejected / active,
        "rejected_per_s_peak": max(per_second, default=0),
        # What the users saw, over the finished cards (ms): the longest time one card stood
        # still, and the time from the agent's last chunk to the final card.
        "longest_gap": percentiles(v["longest_gap_s"] for v in views),
        "last_chunk_to_final": percentiles(v["last_chunk_to_final_s"] for v in views),
    }


async def scale(workdir: Path, instances: int, idle: float) -> dict[str, Any]:
    """``instances`` DingTalk instances (one app each) in one gateway process."""
    system = System(f"gateway x{instances}", "gateway", "instant", rate=20.0)
    async with running(system, workdir, apps=instances) as run:
        await asyncio.sleep(1.0)  # let start-up work (token fetches, first allocations) settle
        rss_connected = rss_mb(run.child.pid)
        cpu = cpu_seconds(run.child.pid)
        await asyncio.sleep(idle)
        cpu = cpu_seconds(run.child.pid) - cpu
        return {
            "instances": instances,
            "startup_s": run.startup_s,
            "rss_mb": rss_connected,
            "rss_mb_after_idle": rss_mb(run.child.pid),
            "idle_cpu_percent": 100 * cpu / idle,
            "idle_s": idle,
        }
