"""Speed and memory on MiniLM: HRP after the switch vs stock Keras LoRA.

On the recipe's all-MiniLM-L6-v2 classifier (LoRA rank 8 on q/v):
- step time of an `enable_hrp` model after its switch / a stock
  `backbone.enable_lora(8)` model, interleaved epochs, medians; a second
  stock instance shows the machine's noise;
- the switch's wall time as a share of a whole HRP run, and the extra time
  of the first epoch after it (the train step is recompiled);
- memory: training-state bytes (trainable variables, optimizer slots, the
  roll-back snapshot) in the preheat and in the main phase, and each run's
  peak resident memory measured in its own process.

    KERAS_BACKEND=jax python benchmarks/bench_speed.py [--quick]
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import finetune_minilm as recipe  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_hrp  # noqa: E402
from keras_hrp.state import run_state  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _data(args, n):
    preset = recipe.default_preset()
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(preset, sequence_length=args.seq_len)
    words = "a fine film with a dull plot and some great acting that never quite works".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=rng.integers(8, 30))) for _ in range(n)]
    x = {k: np.asarray(v) for k, v in preprocessor(texts).items()}
    return preset, x, rng.integers(0, 2, size=n).astype("int32")


def _task(preset, args, hrp):
    task = keras_hub.models.TextClassifier.from_preset(preset, num_classes=2, preprocessor=None)
    if hrp:
        keras_hrp.enable_hrp(task, rank=args.rank, preheat_rank=args.preheat_rank)
    else:
        task.backbone.enable_lora(args.rank)
    task.compile(optimizer=keras.optimizers.Adam(1e-4),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return task


def _nbytes(variables):
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)


def _state_bytes(task, snapshot=None):
    state = _nbytes(task.trainable_variables) + _nbytes(task.optimizer.variables)
    return state + (snapshot.nbytes if snapshot is not None else 0)


def bench_steps(args):
    """Median seconds per step of each model, epochs interleaved."""
    batch = args.batch_size
    preset, x, y = _data(args, batch * args.steps_per_epoch)
    models = {"stock": _task(preset, args, False), "stock, 2nd instance": _task(preset, args, False),
              "HRP after the switch": _task(preset, args, True)}
    hrp = models["HRP after the switch"]
    keras.Model.fit(hrp, x, y, batch_size=batch, epochs=1, verbose=0,
                    callbacks=[keras_hrp.HRPCallback(2, verbose=0)])
    for model in models.values():
        keras.Model.fit(model, x, y, batch_size=batch, epochs=1, verbose=0)  # compile
    times = {name: [] for name in models}
    order = list(models.items())
    for i in range(args.repeats):
        for name, model in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            keras.Model.fit(model, x, y, batch_size=batch, epochs=1, verbose=0)
            times[name].append((time.perf_counter() - start) / args.steps_per_epoch)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print("step:", {k: f"{v * 1e3:.1f} ms" for k, v in medians.items()}, flush=True)
    return medians


class _Recorder(keras.callbacks.Callback):
    """Batch-end times, and the training state's bytes after the first step."""

    def __init__(self, hrp=None):
        super().__init__()
        self.hrp, self.batch_ends, self.first_state = hrp, [], None

    def on_train_batch_end(self, batch, logs=None):
        self.batch_ends.append(time.perf_counter())
        if self.first_state is None:
            snapshot = run_state(self.model).snapshot if self.hrp is not None else None
            self.first_state = _state_bytes(self.model, snapshot)


def one_run(args, hrp):
    """A whole run in this process: seconds, switch, memory (JSON on stdout)."""
    preset, x, y = _data(args, args.batch_size * args.run_steps)
    task = _task(preset, args, hrp)
    callback = keras_hrp.HRPCallback(args.preheat_steps, verbose=0) if hrp else None
    recorder = _Recorder(callback)
    start = time.perf_counter()
    keras.Model.fit(task, x, y, batch_size=args.batch_size, epochs=1, verbose=0,
                    callbacks=[callback, recorder] if hrp else [recorder])
    total = time.perf_counter() - start
    steps = np.diff([start] + recorder.batch_ends)
    out = {"seconds": total, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "first_state_bytes": recorder.first_state, "final_state_bytes": _state_bytes(task),
           "median_step": float(np.median(steps)), "steps_ms": [float(t) * 1e3 for t in steps]}
    if hrp:
        at = args.preheat_steps  # steps[at] is the first step after the switch
        out.update(switch_seconds=callback.report.seconds, first_main_step=float(steps[at]))
    print(json.dumps(out))


def _subprocess_run(args, hrp):
    command = [sys.executable, os.path.abspath(__file__), "--one-run", "hrp" if hrp else "stock",
               "--run-steps", str(args.run_steps), "--preheat-steps", str(args.preheat_steps),
               "--rank", str(args.rank), "--preheat-rank", str(args.preheat_rank),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--preheat-rank", type=int, default=32)
    parser.add_argument("--preheat-steps", type=int, default=20)
    parser.add_argument("--run-steps", type=int, default=200, help="steps of the whole runs")
    parser.add_argument("--steps-per-epoch", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--one-run", choices=["stock", "hrp"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.run_steps, args.preheat_steps, args.steps_per_epoch, args.repeats = 12, 4, 4, 3
    return args


def main(argv=None):
    args = parse(argv)
    if args.one_run:
        one_run(args, args.one_run == "hrp")
        return 0
    backend = keras.backend.backend()
    steps = bench_steps(args)
    runs = {name: _subprocess_run(args, name == "hrp") for name in ("stock", "hrp")}
    hrp, stock = runs["hrp"], runs["stock"]
    mib = 1 / 2**20
    lines = [
        f"# Speed and memory on MiniLM, backend `{backend}`{' (quick)' if args.quick else ''}",
        "",
        f"`KERAS_BACKEND={backend} python benchmarks/bench_speed.py{' --quick' if args.quick else ''}`; "
        f"{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')} (JAX on CPU ignores it), keras {keras.__version__}. "
        f"all-MiniLM-L6-v2 classifier, LoRA rank {args.rank} on q/v, batch {args.batch_size}, "
        f"sequence length {args.seq_len}; HRP preheats at rank {args.preheat_rank}.",
        "",
        f"## Training step ({args.repeats} interleaved epochs of {args.steps_per_epoch} steps, medians)",
        "",
        "| model | median step (ms) | ratio to stock |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {t * 1e3:.1f} | {t / steps['stock']:.3f} |" for name, t in steps.items()]
    lines += [
        "",
        f"## One whole run each, {args.run_steps} steps (HRP: {args.preheat_steps} preheat), own process",
        "",
        "| run | wall s | switch s (share) | first step after the switch (s) | median step (ms) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
        f"| stock LoRA | {stock['seconds']:.1f} | – | – | {stock['median_step'] * 1e3:.1f} | {stock['peak_rss_mb']:.0f} |",
        f"| HRP | {hrp['seconds']:.1f} | {hrp['switch_seconds']:.2f} "
        f"({hrp['switch_seconds'] / hrp['seconds']:.1%}) | {hrp['first_main_step']:.2f} | "
        f"{hrp['median_step'] * 1e3:.1f} | {hrp['peak_rss_mb']:.0f} |",
        "",
        "Training state (trainable variables + Adam slots + HRP's roll-back snapshot), MiB: "
        f"HRP preheat {hrp['first_state_bytes'] * mib:.2f}, HRP main {hrp['final_state_bytes'] * mib:.2f}, "
        f"stock LoRA {stock['final_state_bytes'] * mib:.2f}. The frozen backbone (the same in every "
        "run) is in the peak RSS only.",
        "",
    ]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"speed_{backend}{'_quick' if args.quick else ''}")
    lines += [f"![step times]({os.path.basename(path)}.png)", ""]
    with open(f"{path}.md", "w") as f:
        f.write("\n".join(lines))
    with open(f"{path}.json", "w") as f:
        json.dump({"interleaved_step_s": steps, "runs": runs}, f)
    plot(args, backend, runs, f"{path}.png")
    print("\n".join(lines))
    return 0


def plot(args, backend, runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, state_ax) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1]})
    for name, run in runs.items():
        time_ax.plot(np.arange(1, len(run["steps_ms"]) + 1), run["steps_ms"],
                     label="HRP" if name == "hrp" else "stock LoRA", lw=1)
    time_ax.axvline(args.preheat_steps + 0.5, color="gray", ls=":", label="switch")
    time_ax.set_yscale("log")
    time_ax.set_xlabel("step")
    time_ax.set_ylabel("wall time per step (ms, log)")
    time_ax.set_title(f"one whole run each, {backend}")
    time_ax.legend()
    mib = 1 / 2**20
    bars = {"HRP preheat": runs["hrp"]["first_state_bytes"], "HRP main": runs["hrp"]["final_state_bytes"],
            "stock": runs["stock"]["final_state_bytes"]}
    state_ax.bar(list(bars), [b * mib for b in bars.values()], color=["C1", "C1", "C0"])
    state_ax.set_ylabel("training state (MiB)")
    state_ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
