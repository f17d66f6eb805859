"""Helpers shared by the benchmarks: statistics, /proc readings, child processes, tables, JSON.

Everything here is loopback-only and bounded: every child process is started through
:class:`Children`, which kills what is still running when its ``with`` block ends (also on an
exception or Ctrl-C).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from gateway_testkit.process import GATEWAY, loopback_env

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


# -- statistics -----------------------------------------------------------------------------------


def percentiles(values: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds of values in seconds (nearest-rank); NaN when empty."""
    ordered = sorted(values)
    if not ordered:
        return {"p50_ms": math.nan, "p90_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {
        "p50_ms": rank(50) * 1e3,
        "p90_ms": rank(90) * 1e3,
        "p99_ms": rank(99) * 1e3,
        "max_ms": ordered[-1] * 1e3,
    }


# -- /proc ----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux); NaN when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    # After the ")" that ends the command name, utime and stime are the 12th and 13th fields.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (VmRSS); NaN when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


class OtherLoad:
    """CPU seconds used on the machine by processes other than this one and its reaped children
    since creation: the other engineers' test runs on a shared box (from /proc/stat)."""

    def __init__(self) -> None:
        self._start = self._ours(), self._busy(), time.monotonic()

    @staticmethod
    def _busy() -> float:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        # user nice system idle iowait irq softirq steal: busy = all but idle and iowait
        values = [int(v) for v in fields[:8]]
        return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours() -> float:
        own, children = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def cores(self) -> float:
        """Average number of cores the others kept busy."""
        ours, busy, started = self._start
        others = (self._busy() - busy) - (self._ours() - ours)
        return max(0.0, others) / max(1e-9, time.monotonic() - started)


# -- child processes ------------------------------------------------------------------------------


class Children:
    """Starts child processes (stdout/stderr to files in ``logs``) and stops all of them on exit:
    SIGTERM, a short grace, then SIGKILL.  Only processes started here are ever signalled."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self, argv: Sequence[str], *, name: str, cwd: Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        with (
            open(self.logs / f"{name}.stdout", "wb") as out,
            open(self.logs / f"{name}.stderr", "wb") as err,
        ):
            child = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env) if env is not None else loopback_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        self.started.append(child)
        return child

    def gateway(
        self,
        workdir: Path,
        *,
        name: str = "gateway",
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = GATEWAY,
    ) -> subprocess.Popen[bytes]:
        """``gateway run`` on ``workdir/instances`` with ``workdir/gateway.toml``; ``prefix`` is the
        interpreter command (e.g. under a profiler)."""
        argv = [*prefix, "run", "--instances", "instances", "--config", "gateway.toml"]
        return self.start(argv, name=name, cwd=workdir, env=env)

    def stderr(self, name: str) -> str:
        path = self.logs / f"{name}.stderr"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    @staticmethod
    def stop(child: subprocess.Popen[bytes], grace: float = 5.0) -> int | None:
        """SIGTERM (a graceful stop for the gateway), then SIGKILL after ``grace`` s; reaped."""
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(grace)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5.0)
        return child.returncode

    def close(self) -> None:
        for child in self.started:
            self.stop(child, grace=5.0)

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def child_env(profile: Path | None = None) -> dict[str, str]:
    """The environment of a child: loopback without proxies, ``bench/`` importable (the agents and
    the baseline clients live there); with ``profile``, pyinstrument records the whole process
    into ``profile.pstats`` and ``profile.txt`` (``_profile/sitecustomize.py``)."""
    folders = [str(BENCH / "_profile")] if profile else []
    folders += [str(BENCH), os.environ.get("PYTHONPATH", "")]
    extra = {"PYTHONPATH": os.pathsep.join(f for f in folders if f)}
    if profile:
        extra["BENCH_PROFILE"] = str(profile)
    return loopback_env(extra)


# -- profiles -------------------------------------------------------------------------------------


def profiling(pid: int) -> None:
    """Start (first call) or stop and write (second call) the profile of a child started with
    ``child_env(profile=...)``: SIGUSR2 to our own child, see ``_profile/sitecustomize.py``."""
    os.kill(pid, signal.SIGUSR2)


async def profile_written(profile: Path, timeout: float = 60.0) -> Path:
    """Wait for ``profile.pstats`` after the stopping :func:`profiling` call."""
    path = Path(f"{profile}.pstats")
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(path.exists):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no profile at {path} after {timeout} s")
        await asyncio.sleep(0.1)
    return path


#: Where sampled time goes, by "file:function" of each sample's innermost frame (first match wins).
AREAS = (
    ("event loop waiting (epoll)", ("selectors.py", "epoll.poll")),
    ("sqlite (store)", ("sqlite3", "gateway/store/")),
    ("logging", ("logging/", "gateway/logs.py")),
    ("json", ("json/",)),
    ("aiohttp client+server, yarl, multidict", ("aiohttp/", "yarl/", "multidict/")),
    ("tenacity (retry wrapper)", ("tenacity/",)),
    ("asyncio machinery", ("asyncio/",)),
    ("DingTalk driver", ("gateway_dingtalk/",)),
    ("echo driver", ("gateway_echo/",)),
    ("gateway core", ("gateway/",)),
)


def profile_summary(path: Path, top: int = 15) -> dict[str, Any]:
    """The top functions by own time and the share of each :data:`AREAS` entry, from a pstats
    file written by ``_profile/sitecustomize.py``."""
    import pstats

    stats = pstats.Stats(str(path)).stats
    total = sum(row[2] for row in stats.values()) or 1.0
    areas: dict[str, float] = {}
    functions = []
    for (filename, line, name), (_, _, own, cumulative, _) in stats.items():
        where = f"{filename}:{name}"
        area = next((a for a, keys in AREAS if any(k in where for k in keys)), "other")
        areas[area] = areas.get(area, 0.0) + own
        functions.append((own, cumulative, f"{_short(filename)}:{line} {name}"))
    functions.sort(reverse=True)
    return {
        "sampled_s": total,
        "areas_percent": {
            a: 100 * t / total for a, t in sorted(areas.items(), key=lambda i: -i[1])
        },
        "top_own": [
            {
                "function": f,
                "own_percent": 100 * own / total,
                "cumulative_percent": 100 * cum / total,
            }
            for own, cum, f in functions[:top]
        ],
    }


def _short(filename: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


# -- reporting ------------------------------------------------------------------------------------


def table(title: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table: the first column left-aligned, numbers right-aligned."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return (
                f"{value:.2f}"
                if abs(value) < 10
                else f"{value:.1f}"
                if abs(value) < 100
                else f"{value:.0f}"
            )
        return str(value)

    body = [[cell(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)
    ]
    lines = [title]
    lines.append(
        "  "
        + "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    )
    for row in body:
        lines.append(
            "  "
            + "  ".join(
                v.ljust(w) if i == 0 else v.rjust(w)
                for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def meta() -> dict[str, Any]:
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": os.getloadavg(),
    }


def git_commit() -> str:
    """The checkout's commit, with " dirty" when tracked files differ from it (untracked files,
    such as the results being written, do not count); "unknown" outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=BENCH, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=BENCH,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} dirty" if status.strip() else head


def write_json(path: Path, data: Any) -> Path:
    """Indented JSON, except that lists of numbers (the per-message samples) stay on one line."""
    text = json.dumps(data, indent=2, default=_jsonable)
    text = _NUMBER_LIST.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


_NUMBER_LIST = re.compile(r"\[\s+((?:-?[0-9.eE+-]+|NaN),?(?:\s+(?:-?[0-9.eE+-]+|NaN),?)*)\s+\]")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")
