"""Against PEFT: the MiniLM task in HF transformers + PEFT beside keras-hrp.

The PEFT side (LoRA with PEFT's default, Gaussian, PiSSA, OLoRA, LoRA-GA and
EVA inits, plus full fine-tuning) runs in its own virtual environment,
`benchmarks/.venv-peft`, which this script creates from
`benchmarks/requirements-peft.txt` (torch==2.13.0 pinned) when missing. The
keras-hrp side runs `bench_quality.py` (Keras LoRA and HRP) on each Keras
backend. Same splits, batches, steps and learning-rate grid (picked on the
validation split at seed 0) on both sides; one table of test accuracy, median
step time, trainable parameters and the threads each run used.

Keras' q/v LoRA factorizes only the last kernel axis (one A per head, B
shared), so Keras rank 8 trains about 450k parameters where PEFT rank 8
trains about 75k: PEFT runs at rank 8 and at the matched rank 48.

    python benchmarks/bench_peft.py [--quick]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

from common import plots  # noqa: E402
from common import recipe  # noqa: E402
from common.runs import RunCache  # noqa: E402

RESULTS = os.path.join(HERE, "results")
VENV = os.path.join(HERE, ".venv-peft")
PEFT_INITS = ["default", "gaussian", "pissa", "olora", "lora_ga", "eva"]
DEFAULT_CONFIGS = [("default", 8)] + [(init, 48) for init in PEFT_INITS if init != "gaussian"] + [("full", 0)]


def ensure_venv(path):
    """The venv's python, created (or updated) from requirements-peft.txt when its stamp differs."""
    python, stamp = os.path.join(path, "bin", "python"), os.path.join(path, ".installed")
    with open(os.path.join(HERE, "requirements-peft.txt")) as f:
        wanted = f.read()
    installed = open(stamp).read() if os.path.exists(stamp) else None
    if installed != wanted:
        if not os.path.exists(python):
            subprocess.run([sys.executable, "-m", "venv", path], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "-r",
                        os.path.join(HERE, "requirements-peft.txt")], check=True)
        with open(stamp, "w") as f:
            f.write(wanted)
    return python


def run_worker(python, job):
    """Runs `peft_worker.py` on one `job` (a dict) in the PEFT venv's `python`;
    returns the JSON object its last line of output holds."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "job.json")
        with open(path, "w") as f:
            json.dump(job, f)
        done = subprocess.run([python, os.path.join(HERE, "peft_worker.py"), path], capture_output=True,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"the PEFT worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def append_rows(path, header, rows):
    """Appends table `rows` to the results file `path`, written first with
    `header` (its title, text and table head) when it does not exist."""
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(header)
    with open(path, "a") as f:
        f.write("".join(row + "\n" for row in rows))


def _key(args, run):
    return (f"peft|{run['init']}|r={run['rank']}|lr={run['lr']}|seed={run['seed']}|steps={args.steps}"
            f"|bs={args.batch_size}|len={args.seq_len}|threads={args.threads}"
            f"|split={args.split_seed}/{args.val_size}/{args.test_size}")


def peft_runs(args, python, runs, cache):
    """Runs what `cache` lacks in one worker process; returns every result."""
    todo = [run for run in runs if _key(args, run) not in cache]
    if todo:
        texts, labels = recipe.movie_reviews(args.cache)
        parts = [{"texts": [texts[i] for i in idx], "labels": [labels[i] for i in idx]}
                 for idx in recipe.split_indices(len(texts), args.split_seed, args.val_size, args.test_size)]
        job = {"model_dir": recipe.default_preset(), "train": parts[0], "val": parts[1],
               "test": parts[2], "runs": todo, "steps": args.steps, "batch_size": args.batch_size,
               "seq_len": args.seq_len, "ga_batches": args.ga_batches, "threads": args.threads}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(job, f)
            path = f.name
        worker = subprocess.Popen([python, os.path.join(HERE, "peft_worker.py"), path],
                                  stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        for line in worker.stdout:
            item = json.loads(line)
            cache.put(_key(args, item["run"]), item["result"])
            print(f"peft {item['run']}: val {item['result']['val']:.4f}", flush=True)
        code = worker.wait()
        os.remove(path)
        if code != 0:
            raise RuntimeError("the PEFT worker failed; see its output above")
    return [cache.runs[_key(args, run)] for run in runs]


def _cache_path(args):
    return os.path.join(args.out, f"peft{'_quick' if args.quick else ''}_runs.jsonl")


def parse_config(text):
    """`"pissa:48"` -> ("pissa", 48); `"full"` -> ("full", 0)."""
    init, _, rank = text.partition(":")
    if init == "full" and not rank:
        return init, 0
    if init not in PEFT_INITS or not rank.isdigit() or int(rank) < 1:
        raise argparse.ArgumentTypeError(
            f"a PEFT run is INIT:RANK with INIT in {PEFT_INITS}, or 'full'. Received: {text!r}")
    return init, int(rank)


def peft_table(args, python):
    cache = RunCache(_cache_path(args))
    configs = args.configs
    grid = {(init, rank): args.full_lrs if init == "full" else args.lrs for init, rank in configs}
    first = [{"init": i, "rank": r, "lr": lr, "seed": 0} for (i, r) in configs for lr in grid[i, r]]
    results = dict(zip([json.dumps(run, sort_keys=True) for run in first],
                       peft_runs(args, python, first, cache)))
    best = {c: max(grid[c], key=lambda lr: results[json.dumps(
        {"init": c[0], "rank": c[1], "lr": lr, "seed": 0}, sort_keys=True)]["val"]) for c in configs}
    runs = [{"init": i, "rank": r, "lr": best[i, r], "seed": s} for (i, r) in configs for s in range(args.seeds)]
    done = peft_runs(args, python, runs, cache)
    table = {}
    for run, result in zip(runs, done):
        name = "PEFT full fine-tuning" if run["init"] == "full" else f"PEFT LoRA r={run['rank']}, init {run['init']}"
        table.setdefault(name, {"lr": run["lr"], "runs": []})["runs"].append(result)
    return table


def keras_table(args):
    table = {}
    for backend in args.keras_backends:
        out = os.path.join(args.out, "peft_keras")
        command = [sys.executable, os.path.join(HERE, "bench_quality.py"), "--methods", *args.keras_methods,
                   "--steps", str(args.steps), "--seeds", str(args.keras_seeds),
                   "--lrs", *map(str, args.keras_lrs),
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                   "--val-size", str(args.val_size), "--test-size", str(args.test_size),
                   "--split-seed", str(args.split_seed), "--ga-batches", str(args.ga_batches),
                   "--preheat-steps", str(args.preheat_steps), "--cache", args.cache, "--out", out]
        env = {**os.environ, "KERAS_BACKEND": backend, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run(command, check=True, env=env)
        with open(os.path.join(out, f"quality_{backend}.json")) as f:
            summary = json.load(f)["methods"]
        for method, item in summary.items():
            runs = [{"test": t, "val": v, "params": p, "step_ms": ms, "threads": _threads(backend, args)}
                    for t, v, p, ms in zip(item["test"], item["val"], item["params"], item["step_ms"])]
            table[f"keras-hrp {backend}, {method}"] = {"lr": item["lr"], "runs": runs}
    return table


def _threads(backend, args):
    return f"{os.cpu_count()} (XLA)" if backend == "jax" else (
        args.threads if backend == "torch" else f"{os.cpu_count()} (TF pools)")


def write_markdown(args, table, path):
    lines = [
        "# Against PEFT: MiniLM + movie-review sentiment",
        "",
        f"`python benchmarks/bench_peft.py {' '.join(args.argv)}`".replace(" `", "`"),
        "",
        f"Both sides: all-MiniLM-L6-v2, the splits of bench_quality.py (split seed {args.split_seed}, "
        f"{args.val_size} validation / {args.test_size} test), {args.steps} steps of batch "
        f"{args.batch_size}, sequence length {args.seq_len}, Adam (eps 1e-7), LoRA scale 1 on q/v, "
        f"classifier head trained. PEFT rows: learning rate from {args.lrs} (full fine-tuning "
        f"{args.full_lrs}) picked on validation at seed 0, {args.seeds} seeds. keras-hrp rows: "
        f"learning rate from {args.keras_lrs}, {args.keras_seeds} seed(s) (bench_quality.py has "
        f"the 3-seed comparison). HRP's preheat and "
        f"LoRA-GA's {args.ga_batches} gradient batches count as steps; EVA's {args.ga_batches} "
        f"forward-only batches do not. {os.cpu_count()} CPU cores.",
        "",
        "| run | lr | seeds | test accuracy % | trainable params | median step (ms) | threads |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, item in table.items():
        runs = item["runs"]
        tests = [100 * r["test"] for r in runs]
        steps = [r["step_ms"] for r in runs if r.get("step_ms") is not None]
        lines.append(
            f"| {name} | {item['lr']:g} | {len(runs)} | {np.mean(tests):.2f} ± {np.std(tests):.2f} | "
            f"{runs[0]['params']:,} | {np.median(steps) if steps else float('nan'):.0f} | "
            f"{runs[0].get('threads', '')} |"
        )
    lines += ["", f"![accuracy and step time]({os.path.basename(path)[:-3]}.png)", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(table, path):
    """Test accuracy (mean ± std) and median step time per row, side by side."""
    names = list(table)[::-1]
    runs = [table[name]["runs"] for name in names]
    colors = ["C1" if name.startswith("keras-hrp") else "C0" for name in names]
    fig, (acc_ax, time_ax) = plots.figure(11, 0.35 * len(names) + 1.5, columns=2, sharey=True)
    acc = [100 * np.mean([r["test"] for r in rs]) for rs in runs]
    acc_ax.barh(names, acc, xerr=[100 * np.std([r["test"] for r in rs]) for rs in runs], color=colors)
    acc_ax.set_xlim(min(acc) - 3, max(acc) + 2)
    acc_ax.set_xlabel("test accuracy % (mean ± std over seeds)")
    ms = [np.median([r["step_ms"] for r in rs if r.get("step_ms") is not None] or [np.nan]) for rs in runs]
    time_ax.barh(names, ms, color=colors)
    time_ax.set_xlabel("median training step (ms)")
    labels = [f"{name} ({rs[0]['params'] / 1e3:,.0f}k)" for name, rs in zip(names, runs)]
    acc_ax.set_yticks(range(len(names)), labels, fontsize=8)
    plots.save(fig, path)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny setting: checks both sides in minutes")
    parser.add_argument("--setup-only", action="store_true", help="create the PEFT venv and stop")
    parser.add_argument("--configs", type=parse_config, nargs="+", default=DEFAULT_CONFIGS,
                        help="PEFT runs as INIT:RANK or 'full'; rank 48 matches Keras rank 8's parameters")
    parser.add_argument("--keras-backends", nargs="*", default=["jax", "tensorflow", "torch"])
    parser.add_argument("--keras-methods", nargs="+", default=["keras", "hrp"])
    parser.add_argument("--keras-lrs", type=float, nargs="+", default=[2e-3],
                        help="default: what bench_quality.py picked on validation for both")
    parser.add_argument("--keras-seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=2, help="PEFT seeds at the picked rate")
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 2e-3])
    parser.add_argument("--full-lrs", type=float, nargs="+", default=[3e-5, 1e-4])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (both sides)")
    parser.add_argument("--preheat-steps", type=int, default=20)
    parser.add_argument("--ga-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--split-seed", type=int, default=1234)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=4000)
    parser.add_argument("--venv", default=VENV)
    parser.add_argument("--cache", default=".data", help="where the data is cached")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.quick:
        args.steps, args.seeds, args.preheat_steps, args.ga_batches = 6, 1, 2, 1
        args.lrs, args.full_lrs, args.val_size, args.test_size = args.lrs[:1], args.full_lrs[:1], 64, 64
        args.keras_lrs = args.keras_lrs[:1]
    return args


def main(argv=None):
    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    try:
        python = ensure_venv(args.venv)
        if args.setup_only:
            return 0
        recipe.default_preset()
        recipe.movie_reviews(args.cache)
    except (recipe.SetupError, subprocess.CalledProcessError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = {**keras_table(args), **peft_table(args, python)}
    path = os.path.join(args.out, f"peft{'_quick' if args.quick else ''}.md")
    write_markdown(args, table, path)
    plot(table, path[:-3] + ".png")
    print(open(path).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
