"""Timing shared by the benchmarks: wall time of a run and the CPU other processes took meanwhile.

The machine may be shared. Every timed run records how many cores other processes kept busy
(from /proc/stat, minus this process's own CPU time); a run during which they used more than
--max_others cores is disturbed and timed again, and a figure without enough undisturbed runs
says so instead of passing for a measurement.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import time

from absl import flags

_MAX_OTHERS = flags.DEFINE_float(
    "max_others", 0.25, "A timed run during which other processes used more cores than this is "
    "disturbed and timed again (up to 3 x --repeats runs per figure).")


def max_others() -> float:
    """The --max_others threshold, in cores."""
    return _MAX_OTHERS.value


def busy_seconds() -> float:
    """CPU seconds all processes have used on this machine (from /proc/stat)."""
    try:
        with open("/proc/stat") as stream:
            fields = [int(value) for value in stream.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclasses.dataclass
class Timing:
    """One timed run: wall seconds, the cores this process and other processes kept busy."""

    seconds: float
    others: float
    own: float

    @property
    def clean(self) -> bool:
        return self.others <= max_others()


class Stopwatch:
    """Started on creation; `stop()` gives the `Timing` since then (for callbacks)."""

    def __init__(self):
        self._busy, self._own, self._start = busy_seconds(), own_seconds(), time.perf_counter()

    def stop(self) -> Timing:
        seconds = time.perf_counter() - self._start
        own_cores = (own_seconds() - self._own) / seconds
        others = (busy_seconds() - self._busy) / seconds - own_cores
        return Timing(seconds, max(others, 0.0), own_cores)


def timed(function) -> tuple[Timing, object]:
    """Calls `function()`; its `Timing` and return value."""
    watch = Stopwatch()
    value = function()
    return watch.stop(), value


def count_clean(timings) -> int:
    return sum(timing.clean for timing in timings)


def summary(timings, work: float, unit: str, repeats: int) -> dict:
    """Median rate (work / seconds) of the undisturbed runs, with spread and others' load.

    With fewer than `repeats` undisturbed runs every run counts and the figure is marked
    disturbed.
    """
    clean = [timing for timing in timings if timing.clean][:repeats]
    used = clean if len(clean) >= repeats else list(timings)
    rates = [work / timing.seconds for timing in used]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "unit": unit, "runs": rates, "others_cores": max(timing.others for timing in used),
            "own_cores": statistics.median(timing.own for timing in used),
            "disturbed": len(clean) < repeats, "discarded_runs": len(timings) - len(used)}


def round_robin(runs: dict, repeats: int) -> dict:
    """Times every run, interleaved, until each has `repeats` undisturbed timings.

    `runs` maps a name to an already warmed-up function; each is given up after 3 x repeats
    timings. Interleaving lets the compared runs see the same background load.
    """
    timings = {name: [] for name in runs}
    for _ in range(3 * repeats):
        pending = [name for name in runs if count_clean(timings[name]) < repeats]
        if not pending:
            break
        for name in pending:
            timings[name].append(timed(runs[name])[0])
    return timings


def load_average() -> str:
    return "load average: " + ", ".join(f"{value:.2f}" for value in os.getloadavg())


def environment(**extra) -> dict:
    """What the figures were measured on: versions, CPU model, cores, memory, plus `extra`."""
    import platform

    import keras
    import numpy as np
    import tensorflow as tf

    import tfmir

    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as stream:
            names = [line.split(":", 1)[1].strip() for line in stream
                     if line.startswith("model name")]
            cpu_model = names[0] if names else cpu_model
    except OSError:
        pass
    return {
        "python": platform.python_version(), "tensorflow": tf.__version__,
        "keras": keras.__version__, "numpy": np.__version__, "tfmir": tfmir.__version__,
        "cpu": cpu_model,
        "cores": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count()),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"),
        **extra,
    }


def write_json(path: str | None, results: dict) -> None:
    """Writes every figure to `path` (--output_json), when one is given."""
    if path:
        import json

        with open(path, "w") as stream:
            json.dump(results, stream, indent=2, default=str)
        print(f"wrote {path}")
