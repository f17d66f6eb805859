"""The side-by-side chart of a run: latency distributions, makespans, streaming, quota, scale.

``bench/run.py`` draws it at the end of a run; to redraw it from the JSON files a run wrote::

    python bench/_chart.py OUT.png bench/results/DATE-*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: write files only
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

COLORS = {"gateway": "tab:blue", "floor": "tab:gray", "reference": "tab:red"}


def color(label: str) -> str:
    for key, value in COLORS.items():
        if label.startswith(key):
            return value
    return "tab:orange"  # the AsyncChatbotHandler baseline(s)


def draw(results: dict[str, Any], path: Path) -> Path | None:
    panels = [
        (name, drawer)
        for name, drawer in (
            ("burst", _burst_final),
            ("burst", _burst_ack),
            ("steady", _steady_ack),
            ("slow", _slow),
            ("streaming", _streaming),
            ("quota", _quota),
            ("scale", _scale),
        )
        if name in results
    ]
    if not panels:
        return None
    columns = min(4 if len(panels) > 6 else 3, len(panels))
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 4.6 * rows), squeeze=False)
    for ax, (name, drawer) in zip(axes.flat, panels, strict=False):
        drawer(ax, results[name])
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    figure.suptitle("imgateway vs baselines against the DingTalk emulator (127.0.0.1, 2 cores)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _cdf(ax: Axes, runs: dict[str, list[dict[str, Any]]], key: str, title: str) -> None:
    for label, results in runs.items():
        values = sorted(v * 1e3 for r in results for v in r["samples"][key] if v == v)
        if values:
            ax.plot(
                values,
                [(i + 1) / len(values) for i in range(len(values))],
                label=label,
                color=color(label),
            )
    ax.set_xscale("log")
    ax.set_xlabel("ms after the push (log)")
    ax.set_ylabel("fraction of messages")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _burst_final(ax: Axes, runs: dict[str, list[dict[str, Any]]]) -> None:
    n = next(iter(runs.values()))[0]["messages"]
    _cdf(ax, runs, "final", f"burst of {n}: time to the final card")


def _burst_ack(ax: Axes, runs: dict[str, list[dict[str, Any]]]) -> None:
    n = next(iter(runs.values()))[0]["messages"]
    _cdf(ax, runs, "ack", f"burst of {n}: ACK latency")
    ax.axvline(50, color="black", linestyle=":", linewidth=1)
    ax.text(50, 0.02, " 50 ms target", fontsize=8)


def _steady_ack(ax: Axes, results: list[dict[str, Any]]) -> None:
    first = results[0]
    rate = first["messages"] / first["push_s"]
    _cdf(
        ax,
        {r["system"]: [r] for r in results},
        "ack",
        f"{first['messages']} at {rate:.0f}/s: ACK latency",
    )
    ax.axvline(50, color="black", linestyle=":", linewidth=1)


def _slow(ax: Axes, results: list[dict[str, Any]]) -> None:
    labels = [r["system"] for r in results]
    values = [r["wall_s"] for r in results]
    bars = ax.barh(labels, values, color=[color(label) for label in labels])
    ax.bar_label(bars, labels=[f"{v:.1f} s" for v in values], fontsize=8, padding=2)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linestyle=":", linewidth=1)
    ax.set_xlabel("makespan, s (log); dotted: one agent latency")
    ax.set_title(f"slow agent: {results[0]['messages']} answers of 1 s each")
    ax.invert_yaxis()


def _streaming(ax: Axes, results: list[dict[str, Any]]) -> None:
    for row, r in enumerate(results):
        times = r.get("update_times", [])
        ax.scatter(times, [row] * len(times), marker="|", s=200, color=color(r["system"]))
    ax.set_yticks(range(len(results)), [r["system"] for r in results])
    ax.set_xlabel("s after the card appeared (each mark: a visible update)")
    ax.set_title("streaming: when the user sees the card change")
    ax.invert_yaxis()
    ax.grid(True, axis="x", alpha=0.3)


def _quota(ax: Axes, results: list[dict[str, Any]]) -> None:
    labels = [r["system"] for r in results]
    rejected = [r["rejected"] for r in results]
    bars = ax.barh(labels, rejected, color=[color(label) for label in labels])
    ax.bar_label(
        bars,
        labels=[
            f"{r['rejected']} (finished {r['answered']}/{r['conversations']}"
            + (f" in {r['completion_s']:.0f} s)" if r["answered"] else ")")
            for r in results
        ],
        fontsize=8,
        padding=2,
    )
    ax.set_xlabel("calls rejected with 403 QpsLimit")
    ax.set_title(f"{results[0]['conversations']} streamed answers at once, limit 20 calls/s")
    ax.invert_yaxis()
    ax.margins(x=0.6)


def _scale(ax: Axes, results: list[dict[str, Any]]) -> None:
    counts = [r["instances"] for r in results]
    ax.plot(counts, [r["rss_mb"] for r in results], marker="o", label="RSS MiB")
    ax.plot(counts, [r["idle_cpu_percent"] for r in results], marker="s", label="idle CPU %")
    ax.plot(counts, [r["startup_s"] * 10 for r in results], marker="^", label="start-up, 0.1 s")
    ax.axhline(200 / 1.048576, color="black", linestyle=":", linewidth=1)
    ax.set_xlabel("DingTalk instances in one process")
    ax.set_title("scale (dotted: 200 MB target)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def main(argv: list[str]) -> int:
    out, *inputs = argv
    results: dict[str, Any] = {}
    for name in inputs:
        data = json.loads(Path(name).read_text())
        results.update((key, value) for key, value in data.items() if key != "meta")
    drawn = draw(results, Path(out))
    print(f"wrote {drawn}" if drawn else "nothing to draw")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
