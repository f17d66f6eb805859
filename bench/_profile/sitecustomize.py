"""Profiles a child process with pyinstrument between two SIGUSR2 when ``BENCH_PROFILE`` is set.

The benchmarks put this folder first on a child's ``PYTHONPATH`` (see ``_common.child_env``), so
any ``gateway run`` can be profiled without changing its command line.  The first SIGUSR2 starts
the profiler (after start-up and warm-up, so imports do not count), the second stops it and writes
``BENCH_PROFILE.txt`` (pyinstrument's call tree) and then ``BENCH_PROFILE.pstats`` (for
``pstats``; written last, under a temporary name, so a waiter never reads half a file).  Only the
main thread, where the event loop runs, is sampled; the loop waiting in ``epoll`` shows as such.
The gateway leaves SIGUSR2 alone, so Python runs this handler on the main thread.
"""

import os
import signal

_path = os.environ.get("BENCH_PROFILE")
if _path:
    from pyinstrument import Profiler
    from pyinstrument.renderers import PstatsRenderer

    _state = {}

    def _toggle(signum, frame):
        profiler = _state.pop("profiler", None)
        if profiler is None:
            profiler = _state["profiler"] = Profiler(interval=0.001, async_mode="disabled")
            profiler.start()
            return
        session = profiler.stop()
        with open(_path + ".txt", "w") as out:
            out.write(profiler.output_text(unicode=True, show_all=False))
        with open(_path + ".pstats.part", "wb") as out:
            # render() returns the marshalled bytes decoded with surrogateescape; undo that.
            out.write(PstatsRenderer().render(session).encode("utf-8", "surrogateescape"))
        os.replace(_path + ".pstats.part", _path + ".pstats")

    signal.signal(signal.SIGUSR2, _toggle)
