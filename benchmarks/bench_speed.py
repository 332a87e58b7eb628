"""Training speed and memory: keras-hrp's LoRA path vs stock Keras LoRA.

Each setting compares, at the same rank and targets, stock Keras LoRA
(`backbone.enable_lora`), a second stock instance (the noise floor) and
keras-hrp's LoRA (`enable_hrp(..., preheat_rank=None)`: the unmerged path an
HRP model also trains on after its switch):

- `minilm:qv`: the recipe's all-MiniLM-L6-v2 classifier, rank 8 on q/v;
- `minilm:all`: the same, rank 8 on every linear layer of every block;
- `gemma:all`: a Gemma-shaped decoder built from config (hidden 1024,
  4 blocks, 8 query heads / 1 key-value head of 128, MLP 4096, sequence
  512), every linear layer;
- `smollm:all` (opt-in): the decoder recipe's real SmolLM2-135M-Instruct,
  every linear layer, the recipe's batch (8 x 48 tokens); its PEFT row
  loads the same GGUF file in transformers (`gguf_file=`).

Step time: epochs interleaved in one process, the median step. Memory: each model
trains in its own process; the peak resident memory of its training steps
above the model at rest (after its first, compiling step), and the run's
whole peak. For `minilm:qv` also one whole HRP run (preheat, switch, main
phase) against a stock run: the switch's share and the first step after it.

    KERAS_BACKEND=jax python benchmarks/bench_speed.py [--quick] [--settings minilm:all ...]
    KERAS_BACKEND=jax python benchmarks/bench_speed.py --settings smollm:all --tag _smollm
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_hrp  # noqa: E402
from keras_hrp.state import run_state  # noqa: E402

from common import plots  # noqa: E402
from common import recipe  # noqa: E402
from common import smollm  # noqa: E402
from common import timing  # noqa: E402

RESULTS = os.path.join(HERE, "results")
# PEFT module names of the same targets (suffix matches; "output.dense" is both
# the attention output and the MLP output, "dense" alone would add the pooler).
PEFT_TARGETS = {"qv": ["query", "value"], "all": ["query", "key", "value", "output.dense", "intermediate.dense"],
                "smollm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
SETTINGS = ("minilm:qv", "minilm:all", "gemma:all", "smollm:all")
DECODERS = ("gemma", "smollm")  # causal LMs trained on token ids; the others classify sentences
KINDS = ("stock", "stock, 2nd instance", "keras-hrp")
GEMMA = dict(num_layers=4, num_query_heads=8, num_key_value_heads=1, hidden_dim=1024,
             intermediate_dim=8192, head_dim=128)  # KerasHub's Gemma MLP is intermediate_dim / 2 wide


def _targets(setting):
    family, targets = setting.split(":")
    names = {"minilm": "bert", "smollm": "llama"}.get(family, family)
    return None if targets == "qv" else list(keras_hrp.hub.LINEAR_LAYER_NAMES[names])


def data(setting, args, n):
    """`(x, y)` of `n` examples for `setting`'s model."""
    rng = np.random.default_rng(0)
    if setting.startswith(DECODERS):
        vocab, length = ((args.vocab, args.gemma_seq_len) if setting.startswith("gemma")
                         else (len(smollm.read_metadata()["tokenizer.ggml.tokens"]), args.seq_len))
        ids = rng.integers(1, vocab, size=(n, length + 1)).astype("int32")
        x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1], dtype=bool)}
        return x, ids[:, 1:]
    texts, labels = _texts(n)
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(
        recipe.default_preset(), sequence_length=args.seq_len)
    return {k: np.asarray(v) for k, v in preprocessor(texts).items()}, labels


def _texts(n):
    rng = np.random.default_rng(0)
    words = "a fine film with a dull plot and some great acting that never quite works".split()
    texts = [" ".join(rng.choice(words, size=rng.integers(8, 30))) for _ in range(n)]
    return texts, rng.integers(0, 2, size=n).astype("int32")


def peft_step(setting, args):
    """PEFT's median step (ms) and memory on the same setting, in the PEFT benchmark's venv."""
    import bench_peft

    python = bench_peft.ensure_venv(bench_peft.VENV)
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))
    if setting.startswith("smollm"):
        x, _ = data(setting, args, args.smollm_batch_size)
        ids = np.concatenate([x["token_ids"], x["token_ids"][:, -1:]], 1)
        job = {"threads": threads, "speed": {"rank": args.rank, "targets": PEFT_TARGETS["smollm"],
                                             "gguf": smollm.gguf_path(), "token_ids": ids.tolist(),
                                             "repeats": 2 + args.gemma_repeats * args.steps_per_epoch}}
    else:
        texts, labels = _texts(args.batch_size)
        job = {"model_dir": recipe.default_preset(), "texts": texts, "labels": labels.tolist(),
               "seq_len": args.seq_len, "threads": threads,
               "speed": {"rank": args.rank, "targets": PEFT_TARGETS[setting.split(":")[1]],
                         "repeats": 2 + args.repeats * args.steps_per_epoch}}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    try:
        out = subprocess.run([python, os.path.join(HERE, "peft_worker.py"), f.name], capture_output=True,
                             text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        os.remove(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"the PEFT worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def model(setting, kind, args, rank=None, targets=None):
    """A compiled task for `setting` with LoRA of `kind` ('stock', 'keras-hrp', 'hrp', or
    'keras-hrp, full': factorization 'full'), at `args.rank` on the setting's targets unless
    `rank` / `targets` say otherwise."""
    if setting.startswith("gemma"):
        backbone = keras_hub.models.GemmaBackbone(vocabulary_size=args.vocab, dtype=args.dtype, **GEMMA)
        task = keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
    elif setting.startswith("smollm"):
        task = smollm.causal_lm(args.cache, sequence_length=args.seq_len)  # fit bypasses its preprocessor
    else:
        task = keras_hub.models.TextClassifier.from_preset(recipe.default_preset(), num_classes=2,
                                                           preprocessor=None)
    rank, targets = rank or args.rank, targets or _targets(setting)
    if kind.startswith("stock"):
        task.backbone.enable_lora(rank, target_layer_names=targets)
    else:
        preheat_rank = args.preheat_rank if kind == "hrp" else None
        keras_hrp.enable_hrp(task, rank=rank, preheat_rank=preheat_rank, target_layer_names=targets,
                             rank_allocation="uniform",
                             factorization="full" if kind.endswith("full") else "per_head")
    task.compile(optimizer=keras.optimizers.Adam(1e-4),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return task


def batch_size(setting, args):
    family = setting.split(":")[0]
    return {"gemma": args.gemma_batch_size, "smollm": args.smollm_batch_size}.get(family, args.batch_size)


def bench_steps(setting, args):
    """Median seconds per step of each kind, epochs interleaved (`timing.fit_epoch`)."""
    batch, steps = batch_size(setting, args), args.steps_per_epoch
    x, y = data(setting, args, batch * steps)
    models = {kind: model(setting, kind, args) for kind in KINDS}

    fits = {kind: timing.fit_epoch(task, x, y, batch) for kind, task in models.items()}
    for fit in fits.values():
        fit()  # compile
    repeats = args.gemma_repeats if setting.startswith(DECODERS) else args.repeats
    medians = timing.medians(timing.interleaved(fits, repeats))
    print(setting, {k: f"{v * 1e3:.1f} ms" for k, v in medians.items()}, flush=True)
    return medians


def _nbytes(variables):
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)


def _state_bytes(task, snapshot=None):
    state = _nbytes(task.trainable_variables) + _nbytes(task.optimizer.variables)
    return state + (snapshot.nbytes if snapshot is not None else 0)


class _Recorder(keras.callbacks.Callback):
    """Batch-end times; after the first step the training state's bytes and a fresh memory peak."""

    def __init__(self, hrp):
        super().__init__()
        self.hrp, self.batch_ends, self.first_state = hrp, [], None
        self.rest_mib = self.first_peak_mib = None

    def on_train_batch_end(self, batch, logs=None):
        self.batch_ends.append(time.perf_counter())
        if self.first_state is None:
            snapshot = run_state(self.model).snapshot if self.hrp else None
            self.first_state = _state_bytes(self.model, snapshot)
            self.rest_mib, self.first_peak_mib = timing.rss_mib(), timing.peak_rss_mib()
            timing.reset_peak()


def one_run(args):
    """One model training `args.run_steps` steps in this process (JSON on stdout)."""
    setting, kind = args.one_run
    batch = batch_size(setting, args)
    x, y = data(setting, args, batch * args.run_steps)
    task = model(setting, kind, args)
    callback = keras_hrp.HRPCallback(args.preheat_steps, verbose=0) if kind == "hrp" else None
    recorder = _Recorder(kind == "hrp")
    start = time.perf_counter()
    keras.Model.fit(task, x, y, batch_size=batch, epochs=1, verbose=0,
                    callbacks=[c for c in (callback, recorder) if c is not None])
    total = time.perf_counter() - start
    steps = np.diff([start] + recorder.batch_ends)
    out = {"seconds": total, "rest_mib": recorder.rest_mib, "step_peak_mib": timing.peak_rss_mib(),
           "run_peak_mib": max(recorder.first_peak_mib, timing.peak_rss_mib()),
           "first_state_bytes": recorder.first_state, "final_state_bytes": _state_bytes(task),
           "median_step": float(np.median(steps[1:])), "steps_ms": [float(t) * 1e3 for t in steps]}
    if callback is not None:
        at = args.preheat_steps  # steps[at] is the first step after the switch
        out.update(switch_seconds=callback.report.seconds, first_main_step=float(steps[at]))
    print(json.dumps(out))


def _subprocess_run(args, setting, kind, steps):
    command = [sys.executable, os.path.abspath(__file__), "--one-run", setting, kind, "--run-steps", str(steps)]
    for name in ("rank", "preheat_rank", "preheat_steps", "batch_size", "seq_len", "gemma_batch_size",
                 "gemma_seq_len", "smollm_batch_size", "vocab", "dtype", "cache"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{setting} {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS[:3]))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--preheat-rank", type=int, default=32)
    parser.add_argument("--preheat-steps", type=int, default=20)
    parser.add_argument("--run-steps", type=int, default=200, help="steps of the whole minilm:qv runs")
    parser.add_argument("--memory-steps", type=int, default=4, help="steps of each memory run")
    parser.add_argument("--steps-per-epoch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--gemma-repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--gemma-batch-size", type=int, default=1)
    parser.add_argument("--smollm-batch-size", type=int, default=8, help="the decoder recipe's batch")
    parser.add_argument("--gemma-seq-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096, help="the Gemma-shaped model's vocabulary")
    parser.add_argument("--dtype", default="float32", help="the Gemma-shaped model's dtype policy")
    parser.add_argument("--no-peft", dest="peft", action="store_false",
                        help="skip the PEFT rows (they need benchmarks/.venv-peft, created when missing)")
    parser.add_argument("--cache", default=os.path.join(HERE, "..", ".data"),
                        help="where smollm:all's dequantized weights are cached")
    parser.add_argument("--one-run", nargs=2, metavar=("SETTING", "KIND"), help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help="appended to the result files' names (another setting)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.run_steps, args.preheat_steps, args.repeats, args.gemma_repeats = 12, 4, 3, 3
        args.steps_per_epoch, args.memory_steps, args.gemma_seq_len = 2, 3, 128
    return args


def main(argv=None):
    args = parse(argv)
    if args.one_run:
        one_run(args)
        return 0
    backend = keras.backend.backend()
    results = {}
    for setting in args.settings:
        steps = bench_steps(setting, args)
        memory = {kind: _subprocess_run(args, setting, kind, args.memory_steps) for kind in ("stock", "keras-hrp")}
        results[setting] = {"steps": steps, "memory": memory}
        if args.peft and not setting.startswith("gemma"):
            results[setting]["peft"] = peft_step(setting, args)
    if "minilm:qv" in args.settings:
        results["whole runs"] = {kind: _subprocess_run(args, "minilm:qv", kind, args.run_steps)
                                 for kind in ("stock", "hrp")}
    path = os.path.join(args.out, f"speed_{backend}{args.tag}{'_quick' if args.quick else ''}")
    os.makedirs(args.out, exist_ok=True)
    with open(f"{path}.json", "w") as f:
        json.dump(results, f)
    lines = write_markdown(args, backend, results, f"{path}.md")
    if "whole runs" in results:
        plot(args, backend, results["whole runs"], f"{path}.png")
    print("\n".join(lines))
    return 0


def write_markdown(args, backend, results, path):
    quick = " --quick" if args.quick else ""
    lines = [
        f"# Training speed and memory, backend `{backend}`{quick}",
        "",
        f"`KERAS_BACKEND={backend} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python benchmarks/bench_speed.py{quick}`; "
        f"{timing.machine(backend, keras.__version__)}.",
        f"LoRA rank {args.rank}, Adam. MiniLM: batch {args.batch_size}, sequence {args.seq_len}. "
        f"Gemma-shaped: {GEMMA}, vocabulary {args.vocab}, {args.dtype}, batch {args.gemma_batch_size}, "
        f"sequence {args.gemma_seq_len}. "
        + ("SmolLM2-135M-Instruct (the decoder recipe's real weights, float32, 30 blocks): batch "
           f"{args.smollm_batch_size}, sequence {args.seq_len}, every linear layer. " if "smollm:all" in args.settings else "")
        + "keras-hrp = `enable_hrp(..., preheat_rank=None)` (the "
        "unmerged path; an HRP model trains on it after its switch).",
        "",
        f"## Step time ({args.steps_per_epoch}-step epochs interleaved, {args.repeats} repeats, "
        f"the decoders {args.gemma_repeats}; median of the steps, each batch begin to batch end) and memory (own process, {args.memory_steps} steps)",
        "",
        "| setting | stock (ms) | stock, 2nd instance / stock | keras-hrp (ms) | keras-hrp / stock | "
        "PEFT (ms) / stock | step peak above rest, stock → keras-hrp (MiB) | run peak, stock → keras-hrp (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting in args.settings:
        steps, memory = results[setting]["steps"], results[setting]["memory"]
        stock, ours = memory["stock"], memory["keras-hrp"]
        peft = results[setting].get("peft")
        peft = f"{peft['step_ms']:.1f} / {peft['step_ms'] / 1e3 / steps['stock']:.3f}" if peft else "–"
        lines.append(
            f"| {setting} | {steps['stock'] * 1e3:.1f} | {steps['stock, 2nd instance'] / steps['stock']:.3f} | "
            f"{steps['keras-hrp'] * 1e3:.1f} | **{steps['keras-hrp'] / steps['stock']:.3f}** | {peft} | "
            f"{stock['step_peak_mib'] - stock['rest_mib']:.0f} → {ours['step_peak_mib'] - ours['rest_mib']:.0f} | "
            f"{stock['run_peak_mib']:.0f} → {ours['run_peak_mib']:.0f} |"
        )
    lines += [
        "",
        "PEFT: transformers + PEFT LoRA at the same rank on the same modules (torch, in "
        "`benchmarks/.venv-peft`, its own process right after this setting's Keras runs, "
        "same thread count), timed over as many steps.",
    ]
    for setting in args.settings:
        peft = results[setting].get("peft") or {}
        if "step_peak_mib" in peft:
            lines.append(f"PEFT's memory on {setting} (the same measure): step peak above rest "
                         f"{peft['step_peak_mib'] - peft['rest_mib']:.0f} MiB, run peak {peft['run_peak_mib']:.0f} MiB.")
    if "whole runs" in results:
        stock, hrp = results["whole runs"]["stock"], results["whole runs"]["hrp"]
        mib = 1 / 2**20
        lines += [
            "",
            f"## One whole run each on minilm:qv, {args.run_steps} steps (HRP: rank {args.preheat_rank}, "
            f"{args.preheat_steps} preheat steps), own process",
            "",
            "| run | wall s | switch s (share) | first step after the switch (s) | median step (ms) | run peak (MiB) |",
            "|---|---|---|---|---|---|",
            f"| stock LoRA | {stock['seconds']:.1f} | – | – | {stock['median_step'] * 1e3:.1f} | {stock['run_peak_mib']:.0f} |",
            f"| HRP | {hrp['seconds']:.1f} | {hrp['switch_seconds']:.2f} "
            f"({hrp['switch_seconds'] / hrp['seconds']:.1%}) | {hrp['first_main_step']:.2f} | "
            f"{hrp['median_step'] * 1e3:.1f} | {hrp['run_peak_mib']:.0f} |",
            "",
            "Training state (trainable variables + Adam slots + HRP's roll-back snapshot), MiB: "
            f"HRP preheat {hrp['first_state_bytes'] * mib:.2f}, HRP main {hrp['final_state_bytes'] * mib:.2f}, "
            f"stock LoRA {stock['final_state_bytes'] * mib:.2f}.",
            "",
            f"![step times]({os.path.basename(path)[:-3]}.png)",
        ]
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return lines


def plot(args, backend, runs, path):
    fig, (time_ax, state_ax) = plots.figure(10, 4, columns=2, gridspec_kw={"width_ratios": [3, 1]})
    for name, run in runs.items():
        time_ax.plot(np.arange(1, len(run["steps_ms"]) + 1), run["steps_ms"],
                     label="HRP" if name == "hrp" else "stock LoRA", lw=1)
    time_ax.axvline(args.preheat_steps + 0.5, color="gray", ls=":", label="switch")
    time_ax.set_yscale("log")
    time_ax.set_xlabel("step")
    time_ax.set_ylabel("wall time per step (ms, log)")
    time_ax.set_title(f"one whole run each, minilm:qv, {backend}")
    time_ax.legend()
    mib = 1 / 2**20
    bars = {"HRP preheat": runs["hrp"]["first_state_bytes"], "HRP main": runs["hrp"]["final_state_bytes"],
            "stock": runs["stock"]["final_state_bytes"]}
    state_ax.bar(list(bars), [b * mib for b in bars.values()], color=["C1", "C1", "C0"])
    state_ax.set_ylabel("training state (MiB)")
    state_ax.tick_params(axis="x", labelrotation=30)
    plots.save(fig, path)


if __name__ == "__main__":
    sys.exit(main())
