"""Timing and memory helpers the benchmarks share.

Speed figures are ratios against a baseline measured in the same run: the
runs alternate their order every repeat and are summarized by medians,
because these machines are noisy.
"""

import os
import platform
import statistics
import time


def interleaved(runs, repeats):
    """Seconds of each of `runs` (name -> callable), `repeats` times, order alternating."""
    times = {name: [] for name in runs}
    order = list(runs.items())
    for i in range(repeats):
        for name, run in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def medians(times, per=1):
    """Median of each list of seconds, divided by `per` (steps per timed call)."""
    return {name: statistics.median(t) / per for name, t in times.items()}


def machine(backend, keras_version):
    """One line: the machine, the threads each backend may use, the versions."""
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return (f"{platform.machine()}, {os.cpu_count()} cores visible, OMP_NUM_THREADS={threads} "
            f"(JAX on CPU ignores it), backend `{backend}`, keras {keras_version}")


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_mib():
    """Resident memory of this process now (MiB)."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mib():
    """Peak resident memory of this process since the last `reset_peak` (MiB)."""
    return _status_kib("VmHWM") / 1024


def reset_peak():
    """Starts a new peak: Linux resets VmHWM to the current RSS on `5 > clear_refs`."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
