"""Quality on real data: every LoRA init (and full fine-tuning) on MiniLM.

all-MiniLM-L6-v2 learns movie-review sentiment (`--task sources`: which of
four sources a sentence comes from; see `common/recipe.py`) with fixed seeded
splits: test, validation, train; with a new classification head, or none
(`--objective prototypes`). Each method runs the same total number of
optimizer steps (HRP's preheat and LoRA-GA's gradient batches count), LoRA
rank 8 on the attention query/value projections (`--targets all`: every
linear layer; `--probe-steps`: the new head alone trains first, a linear
probe, in every method). The learning rate is picked per method from a grid
on the validation split (first seed; a pick at the grid's edge extends the
grid past it), then every seed runs at that rate; the table reports test
accuracy mean ± std. `--ablation` adds HRP variants (run after the grid,
before the extra seeds).

Runs are cached (one JSON line each), so an interrupted run resumes.

    KERAS_BACKEND=jax python benchmarks/bench_quality.py [--quick] [--ablation]
"""

import argparse
import json
import os
import shlex
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_hrp  # noqa: E402

from common import plots  # noqa: E402
from common import recipe  # noqa: E402
from common import timing  # noqa: E402
from common.runs import RunCache  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
LORA_METHODS = ["keras", "gaussian", "pissa", "milora", "olora", "lora_ga", "eva", "hrp"]
# `--targets`: KerasHub's q/v, or every linear layer of each transformer block.
TARGETS = {"qv": None, "all": keras_hrp.hub.LINEAR_LAYER_NAMES["bert"]}
# HRP variants for the "when HRP does not win" ablation: name -> options.
ABLATION = {
    "paper (preheat 10%)": {},
    "preheat 5 steps": {"preheat_steps": 5},
    "preheat 2%": {"preheat_steps_share": 0.02},
    "preheat rank 16": {"preheat_rank": 16},
    "preheat rank 256 (full factorization)": {"preheat_rank": 256},
    "keep head, preheat rank 256 (full)": {"restore_weights": False, "preheat_rank": 256},
    "keep head (no roll back)": {"restore_weights": False},
    "truncated delta": {"init": "truncated_delta"},
    "truncated delta, keep head": {"init": "truncated_delta", "restore_weights": False},
    "warm-up 10 steps": {"warmup_steps": 10},
    "asymmetric": {"variant": "asymmetric"},
    "auto preheat (switch when the subspaces settle)": {"preheat_steps": "auto"},
    "auto rank (rank 8's parameters, spread by spectrum)": {"rank": "auto"},
}


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _accuracy(task, data):
    x, y = data
    return float(np.mean(np.argmax(task.predict(x, batch_size=256, verbose=0), -1) == y))


def new_task(args, preset):
    """The pretrained model with a new classification head, or (`--objective
    prototypes`) the head-free classifier of `recipe.prototype_classifier`."""
    if args.objective == "prototypes":
        return recipe.prototype_classifier(preset, recipe.DESCRIPTIONS[args.task], args.seq_len)
    return keras_hub.models.TextClassifier.from_preset(preset, num_classes=args.num_classes, preprocessor=None)


def zero_shot(args, preset, data):
    task = new_task(args, preset)
    return {"val": _accuracy(task, data[1]), "test": _accuracy(task, data[2])}


def _rank_budget(args, preset):
    """The trainable adapter parameters of rank `args.rank` on the targets."""
    layers = keras_hrp.enable_hrp(new_task(args, preset), args.rank, factorization=args.factorization,
                                  target_layer_names=TARGETS[args.targets])
    return args.rank * sum(sum(keras_hrp.lora.weight_matrix_shape(layer, args.factorization)) for layer in layers)


def linear_probe(task, args, x, y):
    """`--probe-steps`: the new head alone trains on the first batches (Adam
    at `--probe-lr`) before any adapter exists; these steps count."""
    task.backbone.trainable = False
    task.compile(optimizer=keras.optimizers.Adam(args.probe_lr), loss=_loss())
    n = args.probe_steps * args.batch_size
    keras.Model.fit(task, {k: v[:n] for k, v in x.items()}, y[:n], batch_size=args.batch_size, epochs=1, verbose=0)
    task.backbone.trainable = True


def build(method, args, preset, options, x, y):
    """The task for `method`, its callbacks and how many steps its init used."""
    task = new_task(args, preset)
    callbacks, init_steps = [], args.probe_steps
    if args.probe_steps:
        linear_probe(task, args, x, y)
    targets = TARGETS[args.targets]
    if method == "hrp":
        rank = options.get("rank", args.rank)
        keras_hrp.enable_hrp(
            task, rank=rank, preheat_rank=options.get("preheat_rank", args.preheat_rank),
            variant=options.get("variant", "classic"), factorization=args.factorization,
            rank_budget=_rank_budget(args, preset) if rank == "auto" else None, target_layer_names=targets,
            rank_allocation="spectrum" if rank == "auto" else "uniform",
        )
        share = options.get("preheat_steps_share")
        preheat = max(1, round(share * args.steps)) if share else options.get("preheat_steps", args.preheat_steps)
        callbacks.append(keras_hrp.HRPCallback(
            preheat, restore_weights=options.get("restore_weights", True),
            init=options.get("init", "directions"), warmup_steps=options.get("warmup_steps", 0),
            verbose=0,
        ))
    elif method != "full":
        if args.factorization == "full" or targets:  # plain LoRA on the same targets
            keras_hrp.enable_hrp(task, rank=args.rank, factorization=args.factorization, target_layer_names=targets)
        else:
            task.backbone.enable_lora(args.rank)
        size, first = args.batch_size, init_steps
        if method in ("lora_ga", "eva"):  # batches after the probe's
            batches = [({k: v[i * size : (i + 1) * size] for k, v in x.items()}, y[i * size : (i + 1) * size])
                       for i in range(first, first + args.ga_batches)]
        if method == "lora_ga":
            init_steps += args.ga_batches
            keras_hrp.initialize_lora(task, "lora_ga", data=batches, loss=_loss())
        elif method == "eva":  # forward passes only: no step counted
            keras_hrp.initialize_lora(task, "eva", data=[bx for bx, _ in batches])
        elif method != "keras":
            keras_hrp.initialize_lora(task, method)
    return task, callbacks, init_steps


def run(method, lr, seed, args, preset, data, options=None):
    options = options or {}
    train, val, test = data
    keras.utils.set_random_seed(seed)
    x, y = recipe.train_batches(train, seed, args.steps, args.batch_size)
    task, callbacks, init_steps = build(method, args, preset, options, x, y)
    task.compile(optimizer=keras.optimizers.Adam(lr), loss=_loss(), metrics=["accuracy"])
    curve, timer = recipe.LossCurve(), timing.StepTimer()
    params = sum(int(np.prod(v.shape)) for v in task.trainable_variables)
    start = time.perf_counter()
    skip = init_steps * args.batch_size  # the probe's and LoRA-GA's batches count as steps
    x_fit = {k: v[skip:] for k, v in x.items()}
    keras.Model.fit(task, x_fit, y[skip:], batch_size=args.batch_size, epochs=1,
                    callbacks=callbacks + [curve, timer], verbose=0)
    seconds = time.perf_counter() - start
    params = sum(int(np.prod(v.shape)) for v in task.trainable_variables) if method == "hrp" else params
    return {
        "val": _accuracy(task, val), "test": _accuracy(task, test), "seconds": seconds,
        "params": params, "curve": [float(v) for v in curve.losses],
        "step_ms": 1e3 * float(np.median(timer.seconds[2:] or timer.seconds)),  # 2 compiling steps out
    }


def _key(args, method, lr, seed, variant=""):
    return (f"{keras.backend.backend()}|{method}|{variant}|lr={lr}|seed={seed}|steps={args.steps}"
            f"|bs={args.batch_size}|r={args.rank}|R={args.preheat_rank}|P={args.preheat_steps}"
            f"|len={args.seq_len}|split={args.split_seed}/{args.val_size}/{args.test_size}"
            + ("" if args.factorization == "per_head" else f"|f={args.factorization}")
            + ("" if args.task == "movies" else f"|task={args.task}")
            + ("" if args.objective == "head" else f"|obj={args.objective}")
            + ("" if args.targets == "qv" else f"|targets={args.targets}")
            + (f"|probe={args.probe_steps}/lr={args.probe_lr}" if args.probe_steps else ""))


def rate_beyond_edge(val):
    """The next rate to try when the best of `val` ({rate: accuracy}) is at an edge, else None.

    The new rate lies one grid ratio (the outermost spacing) beyond that edge.
    """
    grid = sorted(val)
    if len(grid) < 2:
        return None
    best = max(grid, key=lambda lr: val[lr])
    if best == grid[-1]:
        return float(f"{best * grid[-1] / grid[-2]:.3g}")
    if best == grid[0]:
        return float(f"{best * grid[0] / grid[1]:.3g}")
    return None


def pick_learning_rates(args, cache, preset, data):
    """Per method, the validation accuracies (seed 0) over the grid and the best rate.

    A best rate at the grid's edge extends the grid past it, `--extend-grid` times at most.
    """
    picked = {}
    for method in args.methods:
        grid = list(args.full_lrs if method == "full" else args.lrs)
        val = {}
        for extension in range(args.extend_grid + 1):
            for lr in grid:
                result = cache.get(_key(args, method, lr, 0), lambda: run(method, lr, 0, args, preset, data))
                if result is not None:  # --report-only: the runs done so far
                    val[lr] = result["val"]
            beyond = rate_beyond_edge(val) if extension < args.extend_grid else None
            if beyond is None:
                break
            grid = [beyond]
        if not val:  # --report-only: a method not run
            continue
        val = dict(sorted(val.items()))
        picked[method] = {"lr": max(val, key=val.get), "val_grid": val}
        print(f"{method:9s} validation grid {val}", flush=True)
    return picked


def compare(args, cache, preset, data, picked):
    """Every seed of every method at its picked rate, and more seeds where
    the cache has them (a reduced grid runs fewer seeds than the settings
    it spends them on)."""
    table = {}
    for method, item in picked.items():
        best = item["lr"]
        seeds = [cache.get(_key(args, method, best, s), lambda: run(method, best, s, args, preset, data))
                 for s in range(args.seeds)]
        seeds += [cache.runs[k] for s in range(args.seeds, 10) if (k := _key(args, method, best, s)) in cache.runs]
        seeds = [r for r in seeds if r is not None]  # --report-only: the runs done so far
        table[method] = {**item, "runs": seeds}
        tests = [r["test"] for r in seeds]
        print(f"{method:9s} lr {best:g}: test {np.mean(tests):.4f} ± {np.std(tests):.4f}", flush=True)
    return table


def ablation(args, cache, preset, data, lr):
    rows = {}
    for name, options in ABLATION.items():
        variant = json.dumps(options, sort_keys=True) if options else ""  # "" = compare()'s runs
        keys = [_key(args, "hrp", lr, s, variant=variant) for s in range(10)]
        selected = not args.ablation_variants or name in args.ablation_variants
        runs = [cache.get(key, lambda: run("hrp", lr, s, args, preset, data, options))
                for s, key in enumerate(keys[:args.ablation_seeds])] if selected else []
        runs += [cache.runs[key] for key in keys[len(runs):] if key in cache.runs]  # earlier runs' seeds
        runs = [r for r in runs if r is not None]
        if not runs:  # --report-only: a variant not run
            continue
        rows[name] = runs
        print(f"ablation {name:28s} val {np.mean([r['val'] for r in runs]):.4f}", flush=True)
    return rows


def _mean_std(values, scale=100.0, digits=2):
    mean = f"{scale * np.mean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ± {scale * np.std(values):.{digits}f}"


def write_markdown(args, table, rows, path, png):
    backend = keras.backend.backend()
    n_train, n_val, n_test = args.sizes
    lines = [
        "# Quality on real data: MiniLM + " + {"movies": "movie-review sentiment",
                                               "sources": "the source of a sentence (4 classes)"}[args.task],
        "",
        f"`KERAS_BACKEND={backend} python benchmarks/bench_quality.py {shlex.join(args.argv)}`".replace(" `", "`"),
        "",
        f"all-MiniLM-L6-v2, {n_train} train / {n_val} validation / {n_test} test sentences "
        f"(split seed {args.split_seed}), {args.steps} optimizer steps per run, batch "
        f"{args.batch_size}, sequence length {args.seq_len}, Adam, LoRA rank {args.rank} on "
        + ("q/v (KerasHub's targets" if args.targets == "qv" else "every linear layer of each block (q, k, v, o, MLP in, MLP out")
        + f"; factorization {args.factorization}), HRP: rank {args.preheat_rank} for {args.preheat_steps} "
        f"steps, LoRA-GA: {args.ga_batches} gradient batches (both count as steps), EVA: the inputs of "
        f"{args.ga_batches} batches (forward passes, not counted). "
        + (f"Linear probe first: the new head alone trains {args.probe_steps} steps (Adam, lr {args.probe_lr:g}) "
           "before the adapters are added, in every method (counted as steps). " if args.probe_steps else "")
        + "Learning rate per method: best validation accuracy of the grid at seed 0 (a best rate "
        f"at the grid's edge adds the next rate past it, {args.extend_grid} time(s) at most). "
        f"{args.seeds} seed(s) at that rate (more where the run cache has them). {os.cpu_count()} CPU cores.",
        "",
    ]
    if args.objective == "prototypes":
        lines += [
            "Head-free objective: no new layer; logit k is 20 x the cosine between a sentence's mean-pooled "
            "embedding and the pretrained model's embedding of a description of class k "
            f"({', '.join(repr(d) for d in recipe.DESCRIPTIONS[args.task])}). Before any training this "
            f"zero-shot classifier scores {100 * args.zero_shot['test']:.2f}% on the test split "
            f"({100 * args.zero_shot['val']:.2f}% validation), so the first gradient already carries the task.",
            "",
        ]
    lines += [
        "| method | lr | seeds | test accuracy % (mean ± std) | validation % | mean training loss | "
        "trainable params | s / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, item in table.items():
        runs = item["runs"]
        lines.append(
            f"| {method} | {item['lr']:g} | {len(runs)} | {_mean_std([r['test'] for r in runs])} | "
            f"{_mean_std([r['val'] for r in runs])} | {_mean_std([np.mean(r['curve']) for r in runs], 1.0, 3)} | "
            f"{runs[0]['params']:,} | {np.mean([r['seconds'] for r in runs]):.0f} |"
        )
    grid = "; ".join(
        f"{m}: " + ", ".join(f"{lr:g} → {100 * v:.1f}" for lr, v in item["val_grid"].items())
        for m, item in table.items()
    )
    lines += ["", f"Validation accuracy % over the grid (seed 0): {grid}. Mean training loss: the area "
              "under the per-step training-loss curve over the steps the method trained (its speed of "
              "learning; the preheat's steps included for HRP).", ""]
    if rows:
        lines += [
            f"## HRP ablation (validation split, lr {table['hrp']['lr']:g}, "
            f"{args.ablation_seeds} seeds)",
            "",
            "| HRP variant | validation % | test % |",
            "|---|---|---|",
        ]
        for name, runs in rows.items():
            lines.append(f"| {name} | {_mean_std([r['val'] for r in runs])} | "
                         f"{_mean_std([r['test'] for r in runs])} |")
        lines.append("")
    lines += [f"![loss curves]({os.path.basename(png)})", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(table, path):
    plots.seed_mean_curves(table, path, "optimizer step (LoRA-GA starts after its gradient batches)",
                           "training loss (moving mean, mean over seeds)")


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny setting: checks the pipeline in minutes")
    parser.add_argument("--ablation", action="store_true", help="also run the HRP ablation")
    parser.add_argument("--report-only", action="store_true",
                        help="write the tables from the cached runs; run nothing")
    parser.add_argument("--methods", nargs="+", default=LORA_METHODS + ["full"],
                        choices=LORA_METHODS + ["full"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ablation-seeds", type=int, default=2)
    parser.add_argument("--ablation-variants", nargs="+", choices=list(ABLATION), default=None,
                        help="run only these HRP variants (default: all); the report shows "
                        "every variant the run cache has")
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 2e-3])
    parser.add_argument("--full-lrs", type=float, nargs="+", default=[3e-5, 1e-4])
    parser.add_argument("--extend-grid", type=int, default=1,
                        help="times a best rate at the grid's edge adds the next rate past it")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--factorization", choices=("per_head", "full"), default="per_head",
                        help="of the q/v adapters (every LoRA method)")
    parser.add_argument("--preheat-rank", type=int, default=32)
    parser.add_argument("--preheat-steps", type=int, default=20)
    parser.add_argument("--ga-batches", type=int, default=4, help="LoRA-GA's gradient / EVA's input batches")
    parser.add_argument("--targets", choices=tuple(TARGETS), default="qv",
                        help="LoRA on the attention query/value projections, or on every linear layer")
    parser.add_argument("--probe-steps", type=int, default=0,
                        help="train the new head alone this many steps first (a linear probe; --objective head)")
    parser.add_argument("--probe-lr", type=float, default=3e-2, help="the linear probe's learning rate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--split-seed", type=int, default=1234)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=4000)
    parser.add_argument("--cache", default=".data", help="where the data is cached")
    parser.add_argument("--task", choices=tuple(recipe.TASKS), default="movies",
                        help="movie-review sentiment, or which of four sources a sentence is from")
    parser.add_argument("--objective", choices=("head", "prototypes"), default="head",
                        help="a new classification head, or none: cosine to each class's description")
    parser.add_argument("--tag", default="", help="appended to the result files' names (another setting)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    args.argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    args.num_classes = recipe.TASKS[args.task][1]
    if args.probe_steps and args.objective != "head":
        parser.error(f"--probe-steps trains a new head; --objective {args.objective} has none")
    if args.quick:
        args.steps, args.seeds, args.ablation_seeds, args.extend_grid = 6, 1, 1, 0
        args.preheat_steps, args.ga_batches = 2, 1
        args.lrs, args.full_lrs = args.lrs[:1], args.full_lrs[:1]
        args.val_size, args.test_size = 64, 64
    return args


def main(argv=None):
    args = parse(argv)
    try:
        preset = recipe.default_preset()
        texts, labels = recipe.TASKS[args.task][0](args.cache)
    except recipe.SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(preset, sequence_length=args.seq_len)
    train, val, test = recipe.split_indices(len(texts), args.split_seed, args.val_size, args.test_size)
    args.sizes = (len(train), len(val), len(test))
    data = tuple(recipe.encode(preprocessor, texts, labels, part) for part in (train, val, test))
    os.makedirs(args.out, exist_ok=True)
    task = ("" if args.task == "movies" else f"_{args.task}") + ("" if args.objective == "head" else f"_{args.objective}")
    name = f"quality_{keras.backend.backend()}{task}{'_quick' if args.quick else ''}{args.tag}"
    cache = RunCache(os.path.join(args.out, f"{name}_runs.jsonl"), args.report_only)
    if args.objective == "prototypes":  # the head-free model before any training
        args.zero_shot = cache.get(_key(args, "zero-shot", 0, 0), lambda: zero_shot(args, preset, data))
    picked = pick_learning_rates(args, cache, preset, data)
    rows = ablation(args, cache, preset, data, picked["hrp"]["lr"]) if args.ablation and "hrp" in picked else {}
    table = compare(args, cache, preset, data, picked)
    png = os.path.join(args.out, f"{name}.png")
    plot(table, png)
    methods = {m: {"lr": t["lr"], "mean_loss": [float(np.mean(r["curve"])) for r in t["runs"]],
                   **{k: [r.get(k) for r in t["runs"]] for k in ("test", "val", "params", "step_ms", "seconds")}}
               for m, t in table.items()}
    setting = {k: getattr(args, k) for k in ("task", "objective", "rank", "targets", "factorization",
                                             "preheat_rank", "preheat_steps", "probe_steps", "probe_lr", "steps", "tag")}
    summary = {"setting": {**setting, "command": shlex.join(args.argv)}, "methods": methods}
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    write_markdown(args, table, rows, os.path.join(args.out, f"{name}.md"), png)
    print(f"wrote {args.out}/{name}.md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
