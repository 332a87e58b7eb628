"""Timing and memory helpers the benchmarks share.

Speed figures are ratios against a baseline measured in the same run: the
runs alternate their order every repeat and are summarized by medians,
because these machines are noisy.
"""

import os
import platform
import statistics
import time

import keras


def interleaved(runs, repeats):
    """Seconds of each of `runs` (name -> callable), `repeats` times, order
    alternating: the list of seconds a run returns (`fit_epoch`'s steps),
    else the run's wall time."""
    times = {name: [] for name in runs}
    order = list(runs.items())
    for i in range(repeats):
        for name, run in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            result = run()
            elapsed = time.perf_counter() - start
            times[name].extend(result if isinstance(result, list) else [elapsed])
    return times


class StepTimer(keras.callbacks.Callback):
    """Seconds of each training step, from batch begin to batch end with the
    loss read back (so asynchronous dispatch has finished). Work done once
    per epoch stays out: on TensorFlow here the input pipeline's set-up
    stalled 1-2 s before the first step of some epochs, at random."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        keras.ops.convert_to_numpy((logs or {}).get("loss", 0.0))
        self.seconds.append(time.perf_counter() - self._start)


def fit_epoch(task, x, y, batch_size):
    """A callable that fits `task` one epoch on `(x, y)` and returns the
    seconds of each step (see `StepTimer`)."""

    def run():
        timer = StepTimer()
        keras.Model.fit(task, x, y, batch_size=batch_size, epochs=1, verbose=0, callbacks=[timer])
        return timer.seconds

    return run


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
