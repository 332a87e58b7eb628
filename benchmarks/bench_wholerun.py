"""HRP's whole run against random-init LoRA's, broken down into phases.

One recipe's setting fitted with random-init LoRA (KerasHub's `enable_lora`)
and with HRP (`enable_hrp` + `HRPCallback`), alternating their order every
repeat. `--model minilm`: the classifier recipe (`make minilm`:
all-MiniLM-L6-v2 on movie-review sentiment, LoRA rank 8 on q/v, 200 steps of
32 x 48 tokens; HRP: 20 steps at rank 32 with rank 8 everywhere after).
`--model smollm`: the decoder recipe (`make demo`: SmolLM2-135M-Instruct on
`reviews`, rank 8 on every linear layer, 80 steps of 8 x 64 tokens; HRP: 10
steps at rank 32, ranks spread by the preheated spectra, the default).
Each fit's wall time is split by per-step timers into: compiling (the first
step, and HRP's first step after the switch, above the median step), the
preheat steps, the switch (`report.seconds`), the main-phase steps, and the
rest of `fit` (set-up, callbacks, data). Medians over the repeats.

    KERAS_BACKEND=jax python benchmarks/bench_wholerun.py [--model smollm] [--quick]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_hrp  # noqa: E402

from common import instructions  # noqa: E402
from common import recipe  # noqa: E402
from common import smollm  # noqa: E402
from common import timing  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PHASES = ("compile", "preheat steps", "switch", "main steps", "rest of fit")
# model -> its recipe's defaults: steps, preheat steps, batch size, tokens, repeats
SETTINGS = {"minilm": (200, 20, 32, 48, 3), "smollm": (80, 10, 8, 64, 1)}
MODELS = {"minilm": "all-MiniLM-L6-v2 on movie-review sentiment",
          "smollm": "SmolLM2-135M-Instruct on `reviews` (the decoder recipe, `make demo`)"}
TARGETS = {"minilm": "q/v", "smollm": "every linear layer of the 30 blocks"}
ALLOCATION = {"minilm": "rank 8 everywhere", "smollm": "ranks spread by the preheated spectra, the default"}


def prepare(args):
    """`(build(method) -> compiled model, fit arrays)` for `args.model`'s recipe."""
    if args.model == "smollm":
        train, _, _ = instructions.split(instructions.reviews(args.cache), 0, val_size=0, test_size=256)
        tokenizer = smollm.tokenizer(smollm.read_metadata())
        x, y, weight = instructions.training_arrays(tokenizer, train, args.seq_len, args.steps, args.batch_size, 0)

        def build(method):
            lm = smollm.causal_lm(args.cache, sequence_length=args.seq_len)
            targets = keras_hrp.hub.LINEAR_LAYER_NAMES["llama"]
            if method == "hrp":
                keras_hrp.enable_hrp(lm.backbone, rank=args.rank, preheat_rank=args.preheat_rank,
                                     target_layer_names=targets)
            else:
                lm.backbone.enable_lora(args.rank, target_layer_names=targets)
            lm.compile(optimizer=keras.optimizers.Adam(2e-4), loss=instructions.response_loss())
            return lm

        return build, {"x": x, "y": y, "sample_weight": weight}
    preset = recipe.default_preset()
    texts, labels = recipe.movie_reviews(args.cache)
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(preset, sequence_length=args.seq_len)
    order = np.resize(np.random.default_rng(0).permutation(len(texts)), args.steps * args.batch_size)
    x, y = recipe.encode(preprocessor, texts, labels, order)

    def build(method):
        task = keras_hub.models.TextClassifier.from_preset(preset, num_classes=2, preprocessor=None)
        if method == "hrp":
            keras_hrp.enable_hrp(task, rank=args.rank, preheat_rank=args.preheat_rank, rank_allocation="uniform")
        else:
            task.backbone.enable_lora(args.rank)
        task.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=["accuracy"],
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return task

    return build, {"x": x, "y": y}


def fit(method, args, build, data):
    """`{phase: seconds}` and the wall time of one fit of `method`."""
    keras.utils.set_random_seed(0)
    model = build(method)
    timer = timing.StepTimer()  # first: its step ends before the switch runs
    callbacks = [timer]
    if method == "hrp":
        callbacks.append(keras_hrp.HRPCallback(args.preheat_steps, verbose=0))
    start = time.perf_counter()
    keras.Model.fit(model, **data, batch_size=args.batch_size, epochs=1, callbacks=callbacks, verbose=0)
    wall = time.perf_counter() - start
    steps = np.asarray(timer.seconds)
    first_main = args.preheat_steps if method == "hrp" else 0
    median = float(np.median(steps[first_main + 1:]))
    compiles = [0] + ([first_main] if method == "hrp" else [])
    phases = {
        "compile": float(sum(steps[i] - median for i in compiles)),
        "preheat steps": float(steps[1:first_main].sum() + (median if method == "hrp" else 0.0)),
        "switch": callbacks[1].report.seconds if method == "hrp" else 0.0,
        "main steps": float(steps[first_main + 1:].sum() + median),
    }
    phases["rest of fit"] = wall - float(steps.sum()) - phases["switch"]
    return {"wall": wall, "phases": phases, "step_ms": 1e3 * median,
            "preheat_step_ms": 1e3 * float(np.median(steps[1:first_main])) if method == "hrp" else None}


def write_markdown(args, results, path):
    backend = keras.backend.backend()
    median = {m: {k: float(np.median([r[k] for r in runs])) for k in ("wall", "step_ms")} for m, runs in results.items()}
    phases = {m: {p: float(np.median([r["phases"][p] for r in runs])) for p in PHASES} for m, runs in results.items()}
    lines = [
        f"# Whole run: HRP against random-init LoRA ({backend})",
        "",
        f"`KERAS_BACKEND={backend} python benchmarks/bench_wholerun.py --model {args.model}"
        f"{' --quick' if args.quick else ''}`",
        "",
        f"{timing.machine(backend, keras.__version__)}. {MODELS[args.model]}, {args.steps} steps of "
        f"{args.batch_size} x {args.seq_len} tokens, LoRA rank {args.rank} on {TARGETS[args.model]}; HRP: "
        f"{args.preheat_steps} steps at rank {args.preheat_rank}, then the switch ({ALLOCATION[args.model]}). "
        f"Medians of {args.repeats} fit(s) each, order alternating.",
        "",
        "| phase | random-init LoRA s | HRP s |",
        "|---|---|---|",
    ]
    for phase in PHASES:
        lines.append(f"| {phase} | {phases['random'][phase]:.1f} | {phases['hrp'][phase]:.1f} |")
    lines += [
        f"| **whole fit** | **{median['random']['wall']:.1f}** | **{median['hrp']['wall']:.1f}** |",
        "",
        f"HRP / random whole fit: **{median['hrp']['wall'] / median['random']['wall']:.3f}x**; main-phase "
        f"step {median['hrp']['step_ms']:.0f} ms against {median['random']['step_ms']:.0f} ms "
        f"({median['hrp']['step_ms'] / median['random']['step_ms']:.3f}x); HRP's preheat step "
        f"{np.median([r['preheat_step_ms'] for r in results['hrp']]):.0f} ms.",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SETTINGS), default="minilm")
    parser.add_argument("--quick", action="store_true", help="tiny setting: checks the pipeline in a minute")
    parser.add_argument("--steps", type=int, help="default: the recipe's (200 minilm, 80 smollm)")
    parser.add_argument("--preheat-steps", type=int, help="default: the recipe's (20 minilm, 10 smollm)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--preheat-rank", type=int, default=32)
    parser.add_argument("--batch-size", type=int, help="default: the recipe's (32 minilm, 8 smollm)")
    parser.add_argument("--seq-len", type=int, help="default: the recipe's (48 minilm, 64 smollm)")
    parser.add_argument("--repeats", type=int, help="default: 3 minilm, 1 smollm")
    parser.add_argument("--cache", default=".data")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    defaults = (12, 4, 8, 32, 1) if args.quick else SETTINGS[args.model]
    for name, value in zip(("steps", "preheat_steps", "batch_size", "seq_len", "repeats"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        build, data = prepare(args)
    except recipe.SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = {"random": [], "hrp": []}
    for repeat in range(args.repeats):
        for method in ("random", "hrp") if repeat % 2 == 0 else ("hrp", "random"):
            results[method].append(fit(method, args, build, data))
            print(f"{method:6s} {results[method][-1]['wall']:.1f} s {results[method][-1]['phases']}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    model = "" if args.model == "minilm" else f"_{args.model}"
    name = f"wholerun_{keras.backend.backend()}{model}{'_quick' if args.quick else ''}"
    write_markdown(args, results, os.path.join(args.out, f"{name}.md"))
    print(f"wrote {args.out}/{name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
