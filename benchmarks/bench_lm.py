"""Quality on a real decoder: every LoRA init on SmolLM2-135M-Instruct.

The pretrained decoder (`common/smollm.py`) is instruction-tuned on a real
task (`common/instructions.py`: `reviews` or `docstrings`) with the loss on
the response tokens only, and scored by the held-out response NLL in nats
per token (thousands of tokens, so its noise is far below a point of
accuracy) and the teacher-forced next-token accuracy. Each method runs the
same total number of optimizer steps (HRP's preheat and LoRA-GA's gradient
batches count; EVA's forward passes do not) and, after HRP's switch, the
same trainable parameters (`hrp_rank_auto` spreads rank `--rank`'s budget).

Learning rate: with one `--lrs` value every method runs at it (the untuned
setting); with several, each method's rate is the best validation NLL of
seed 0 over them, then every seed runs at that rate. `full` uses
`--full-lrs`. Runs are cached (one JSON line each): an interrupted grid
resumes, and several processes may fill one cache with different
`--methods` (`--report-only` then writes the tables of everything cached).

    KERAS_BACKEND=jax python benchmarks/bench_lm.py [--quick] [--methods keras hrp ...]
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
import numpy as np  # noqa: E402

import keras_hrp  # noqa: E402

from common import instructions  # noqa: E402
from common import plots  # noqa: E402
from common import smollm  # noqa: E402
from common import timing  # noqa: E402
from common.recipe import LossCurve  # noqa: E402
from common.recipe import SetupError  # noqa: E402
from common.runs import RunCache  # noqa: E402

RESULTS = os.path.join(HERE, "results")
BASELINE = "keras"
INITS = ["keras", "gaussian", "pissa", "milora", "olora", "lora_ga", "eva"]
# HRP settings, each a candidate default: name -> enable_hrp / HRPCallback options.
HRP = {
    "hrp": {},  # the paper's reading: fixed preheat, A = top directions, B = 0, weights rolled back
    "hrp_keep": {"init": "truncated_delta", "restore_weights": False},
    "hrp_auto": {"preheat_steps": "auto"},
    "hrp_rank_auto": {"rank": "auto"},
}
METHODS = INITS + list(HRP) + ["full"]
TARGETS = {"qv": None, "all": keras_hrp.hub.LINEAR_LAYER_NAMES["llama"]}


def packed_loss(y_packed, logits):
    """The response loss for LoRA-GA's gradient, whose `(x, y)` batches have
    no sample weight: `y_packed[..., 0]` the target ids, `[..., 1]` the weights."""
    ops = keras.ops
    ids, weight = ops.cast(y_packed[..., 0], "int32"), y_packed[..., 1]
    nll = keras.losses.sparse_categorical_crossentropy(ids, logits, from_logits=True)
    return ops.sum(nll * weight) / ops.maximum(ops.sum(weight), 1.0)


def rank_budget(args):
    """The adapter parameters of rank `args.rank` on the targets (counted on a spare model)."""
    spare = smollm.causal_lm(args.cache, sequence_length=args.seq_len)
    layers = keras_hrp.enable_hrp(spare.backbone, args.rank, target_layer_names=TARGETS[args.targets])
    return args.rank * sum(sum(keras_hrp.lora.weight_matrix_shape(layer)) for layer in layers)


def build(method, args, lm, batches):
    """Adds `method`'s adapters to `lm`; returns its callbacks and the steps its init used."""
    targets = TARGETS[args.targets]
    if method == "full":
        return [], 0
    if method in HRP:
        options = HRP[method]
        rank = options.get("rank", args.rank)
        budget = rank_budget(args) if rank == "auto" else None
        keras_hrp.enable_hrp(lm.backbone, rank=rank, preheat_rank=args.preheat_rank,
                             target_layer_names=targets, rank_budget=budget,
                             rank_allocation="spectrum" if rank == "auto" else "uniform")
        preheat = options.get("preheat_steps", args.preheat_steps)
        callback = keras_hrp.HRPCallback(
            preheat, restore_weights=options.get("restore_weights", True), init=options.get("init", "directions"),
            verbose=0, max_preheat_steps=args.max_preheat_steps if preheat == "auto" else None)
        return [callback], 0
    lm.backbone.enable_lora(args.rank, target_layer_names=targets)
    if method == "lora_ga":
        keras_hrp.initialize_lora(lm, "lora_ga", data=batches, loss=packed_loss)
        return [], len(batches)
    if method == "eva":  # forward passes only: no step counted
        keras_hrp.initialize_lora(lm, "eva", data=[x for x, _ in batches])
    elif method != "keras":
        keras_hrp.initialize_lora(lm, method)
    return [], 0


def run(method, lr, seed, args, data):
    train, val, test = data
    x, y, weight = train[seed]
    keras.utils.set_random_seed(seed)
    lm = smollm.causal_lm(args.cache, sequence_length=args.seq_len)
    size = args.batch_size
    batches = [({k: v[i * size:(i + 1) * size] for k, v in x.items()},
                np.stack([y[i * size:(i + 1) * size], weight[i * size:(i + 1) * size]], -1).astype("float32"))
               for i in range(args.ga_batches)] if method in ("lora_ga", "eva") else []
    start = time.perf_counter()
    callbacks, init_steps = build(method, args, lm, batches)
    lm.compile(optimizer=keras.optimizers.Adam(lr), loss=instructions.response_loss())
    curve, timer = LossCurve(), timing.StepTimer()
    skip = init_steps * size
    keras.Model.fit(lm, {k: v[skip:] for k, v in x.items()}, y[skip:], sample_weight=weight[skip:],
                    batch_size=size, epochs=1, callbacks=callbacks + [curve, timer], verbose=0)
    seconds = time.perf_counter() - start
    hrp = callbacks[0] if callbacks else None
    return {
        "val": instructions.evaluate(lm, val, args.eval_batch_size),
        "test": instructions.evaluate(lm, test, args.eval_batch_size),
        "params": sum(int(np.prod(v.shape)) for v in lm.trainable_variables),
        "curve": [float(v) for v in curve.losses], "seconds": seconds,
        "step_ms": 1e3 * float(np.median(timer.seconds[2:] or timer.seconds)),
        "switch_step": hrp.switch_step if hrp else None,
    }


def key(args, method, lr, seed):
    return (f"{keras.backend.backend()}|{args.task}|{method}|lr={lr}|seed={seed}|steps={args.steps}"
            f"|bs={args.batch_size}|r={args.rank}|R={args.preheat_rank}|P={args.preheat_steps}"
            f"|maxP={args.max_preheat_steps}|ga={args.ga_batches}|len={args.seq_len}|targets={args.targets}"
            f"|split={args.split_seed}/{args.val_size}/{args.test_size}")


def grid(args, method):
    return args.full_lrs if method == "full" else args.lrs


def results(args, cache, data):
    """Per method: the picked rate, the validation grid (seed 0) and the runs at that rate."""
    table = {}
    for method in args.methods:
        val = {}
        for lr in grid(args, method):
            result = cache.get(key(args, method, lr, 0), lambda: run(method, lr, 0, args, data))
            if result is not None:  # --report-only: the runs done so far
                val[lr] = result["val"]["nll"]
        if not val:
            continue
        best = min(val, key=val.get)
        runs = [cache.get(key(args, method, best, s), lambda: run(method, best, s, args, data))
                for s in range(args.seeds)]
        runs += [cache.runs[k] for s in range(args.seeds, 10) if (k := key(args, method, best, s)) in cache.runs]
        runs = [r for r in runs if r is not None]
        table[method] = {"lr": best, "val_grid": val, "runs": runs}
        nll = [r["test"]["nll"] for r in runs]
        print(f"{method:14s} lr {best:g}: test nll {np.mean(nll):.4f} ± {np.std(nll):.4f} ({len(runs)} seeds)",
              flush=True)
    return table


def difference(a, b):
    """`(mean(a) - mean(b), its standard error or None)`."""
    diff = float(np.mean(a) - np.mean(b))
    if min(len(a), len(b)) < 2:
        return diff, None
    return diff, float(np.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b)))


def _mean_std(values, digits=4):
    mean = f"{np.mean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ± {np.std(values, ddof=1):.{digits}f}"


def write_markdown(args, table, path, png):
    untuned = len(args.lrs) == 1
    lines = [
        f"# Instruction-tuning SmolLM2-135M-Instruct: {args.task}",
        "",
        f"`KERAS_BACKEND={keras.backend.backend()} python benchmarks/bench_lm.py {shlex.join(args.argv)}`",
        "",
        f"{args.sizes[0]:,} train / {args.sizes[1]} validation / {args.sizes[2]} test pairs (split seed "
        f"{args.split_seed}; {args.tokens[0]:,} validation and {args.tokens[1]:,} test response tokens), "
        f"{args.steps} optimizer steps of {args.batch_size} x {args.seq_len} tokens per run, Adam, loss on "
        f"the response tokens only, LoRA rank {args.rank} on "
        + ("every linear layer of the 30 blocks (q, k, v, o, gate, up, down)" if args.targets == "all"
           else "the attention query/value projections")
        + f". HRP: rank {args.preheat_rank} for {args.preheat_steps} steps (`hrp_auto`: until the subspaces "
        f"settle, at most {args.max_preheat_steps}); LoRA-GA: {args.ga_batches} gradient batches (counted as "
        f"steps); EVA: the inputs of {args.ga_batches} batches (forward passes, not counted). "
        + (f"Learning rate {args.lrs[0]:g} for every LoRA method (untuned), {args.full_lrs[0]:g} for full "
           "fine-tuning." if untuned else
           f"Learning rate per method: the best validation NLL at seed 0 over {args.lrs} "
           f"(full fine-tuning: {args.full_lrs}).")
        + f" {os.cpu_count()} CPU cores.",
        "",
        f"Differences are against `{BASELINE}` (random-init LoRA, KerasHub's `enable_lora`) with their "
        "standard error; negative NLL differences are better.",
        "",
        "| method | lr | seeds | test NLL (mean ± std) | vs keras | token accuracy % | validation NLL "
        "| trainable params | s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = [r["test"]["nll"] for r in table[BASELINE]["runs"]] if BASELINE in table else None
    for method, item in table.items():
        runs = item["runs"]
        nll = [r["test"]["nll"] for r in runs]
        if base is None or method == BASELINE:
            versus = ""
        else:
            diff, se = difference(nll, base)
            versus = f"{diff:+.4f}" + ("" if se is None else f" ± {se:.4f}")
        lines.append(
            f"| {method} | {item['lr']:g} | {len(runs)} | {_mean_std(nll)} | {versus} | "
            f"{100 * np.mean([r['test']['token_accuracy'] for r in runs]):.2f} | "
            f"{_mean_std([r['val']['nll'] for r in runs])} | {runs[-1]['params']:,} | "
            f"{np.mean([r['seconds'] for r in runs]):.0f} |")
    if base is not None and len(base) > 1:
        lines += ["", f"Seed-to-seed noise of `{BASELINE}`: test NLL std {np.std(base, ddof=1):.4f} nats/token "
                  f"over {len(base)} seeds (each seed draws its own adapters and batch order)."]
    if not untuned:
        grid_text = "; ".join(f"{m}: " + ", ".join(f"{lr:g} → {v:.4f}" for lr, v in item["val_grid"].items())
                              for m, item in table.items())
        lines += ["", f"Validation NLL over the grid (seed 0): {grid_text}."]
    lines += ["", f"![loss curves]({os.path.basename(png)})", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(table, path):
    plots.seed_mean_curves(table, path, "optimizer step",
                           "training loss (nats/response token, moving mean over seeds)", windows=10)


def prepare(args):
    """`(train arrays per seed, validation, test)` and the split's sizes."""
    pairs = instructions.TASKS[args.task](args.cache)
    train, val, test = instructions.split(pairs, args.split_seed, args.val_size, args.test_size)
    tokenizer = smollm.tokenizer(smollm.read_metadata())
    per_seed = {s: instructions.training_arrays(tokenizer, train, args.seq_len, args.steps, args.batch_size, s)
                for s in range(max(args.seeds, 1))}
    val_arrays = instructions.encode(tokenizer, val, args.seq_len)[:3]
    test_arrays = instructions.encode(tokenizer, test, args.seq_len)[:3]
    args.sizes = (len(train), len(val_arrays[1]), len(test_arrays[1]))
    args.tokens = (int(val_arrays[2].sum()), int(test_arrays[2].sum()))
    return per_seed, val_arrays, test_arrays


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny setting: checks the pipeline in minutes")
    parser.add_argument("--report-only", action="store_true", help="write the tables from the cached runs")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--task", choices=sorted(instructions.TASKS), default="reviews")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4])
    parser.add_argument("--full-lrs", type=float, nargs="+", default=[1e-5])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", choices=tuple(TARGETS), default="all")
    parser.add_argument("--preheat-rank", type=int, default=32)
    parser.add_argument("--preheat-steps", type=int, default=4)
    parser.add_argument("--max-preheat-steps", type=int, default=8, help="hrp_auto's cap")
    parser.add_argument("--ga-batches", type=int, default=2, help="LoRA-GA's gradient / EVA's input batches")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--val-size", type=int, default=64)
    parser.add_argument("--test-size", type=int, default=160)
    parser.add_argument("--cache", default=os.path.join(HERE, "..", ".data"),
                        help="where the data and the dequantized weights are cached")
    parser.add_argument("--tag", default="", help="appended to the result files' names (another setting)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    args.argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    if args.quick:
        args.steps, args.seeds, args.preheat_steps, args.max_preheat_steps = 4, 1, 2, 3
        args.ga_batches, args.val_size, args.test_size, args.lrs = 1, 16, 16, args.lrs[:1]
    return args


def main(argv=None):
    args = parse(argv)
    try:
        data = prepare(args)
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    name = f"lm_{keras.backend.backend()}_{args.task}{'_quick' if args.quick else ''}{args.tag}"
    cache = RunCache(os.path.join(args.out, f"{name}_runs.jsonl"), args.report_only)
    table = results(args, cache, data)
    png = os.path.join(args.out, f"{name}.png")
    plot(table, png)
    setting = {k: getattr(args, k) for k in ("task", "rank", "targets", "preheat_rank", "preheat_steps",
                                             "steps", "lrs", "full_lrs", "tag")}
    summary = {"setting": {**setting, "command": shlex.join(args.argv), "metric": "test NLL (nats/token)"},
               "methods": {m: {"lr": t["lr"], **{k: [r[k]["nll"] for r in t["runs"]] for k in ("test", "val")},
                               "token_accuracy": [r["test"]["token_accuracy"] for r in t["runs"]],
                               "params": [r["params"] for r in t["runs"]]}
                           for m, t in table.items()}}
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    write_markdown(args, table, os.path.join(args.out, f"{name}.md"), png)
    print(f"wrote {args.out}/{name}.md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
