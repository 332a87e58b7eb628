"""The defaults of `HRPCallback()` / `enable_hrp`, chosen from the evidence.

For each candidate default (the paper's reading; keeping the preheat;
automatic preheat length; `rank="auto"`) and every benchmark setting that
measured it (`bench_quality.py`'s MiniLM tasks and its ablation runs,
`bench_lm.py`'s decoder tasks), the improvement over random-init LoRA
(`keras`) with its standard error: accuracy points (higher is better) on
MiniLM, nats/token of held-out NLL (lower is better, so the sign is
flipped) on the decoder. The rule: the default is the candidate with the best
mean improvement, in units of each setting's seed-to-seed std (pooled over
random-init LoRA and the candidates, so the tasks' units compare and other
methods' runs do not move them), among those measured on every
task (a task: one dataset and objective, whatever its LoRA setting) and
never worse than random-init LoRA by more than two standard errors there.

Reads `results/quality_*.json`, their run caches and `results/lm_*.json`;
writes `results/defaults.md`. Runs nothing.

    python benchmarks/defaults.py
"""

import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality_summary  # noqa: E402

RESULTS = quality_summary.RESULTS
BASELINE = "keras"
# candidate -> (its bench_lm method, its bench_quality ablation options; {} = the compared HRP runs)
CANDIDATES = {
    "paper (directions, B = 0, roll back)": ("hrp", {}),
    "keep the preheat (truncated delta, no roll back)": (
        "hrp_keep", {"init": "truncated_delta", "restore_weights": False}),
    "auto preheat length": ("hrp_auto", {"preheat_steps": "auto"}),
    'rank="auto"': ("hrp_rank_auto", {"rank": "auto"}),
}


def _runs(path):
    runs = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                item = json.loads(line)
                runs[item["key"]] = item["result"]
    return runs


def _variant_tests(runs, baseline_keys, options, lr):
    """Test accuracies of the HRP ablation runs with `options` at `lr`, in
    the setting of `baseline_keys` (keys differ only by method, variant, lr, seed)."""
    settings = {key.split("|seed=")[1].split("|", 1)[1] for key in baseline_keys}
    variant = json.dumps(options, sort_keys=True)
    out = []
    for key, result in runs.items():
        parts = key.split("|")
        if parts[1] == "hrp" and parts[2] == variant and parts[3] == f"lr={lr}" \
                and key.split("|seed=")[1].split("|", 1)[1] in settings:
            out.append(result["test"])
    return out


def pooled_std(methods):
    """The seed-to-seed std of a setting, pooled over `methods` with 2+ seeds:
    the baseline and the candidates, so other methods' runs do not move it."""
    variances = [np.var(v, ddof=1) for v in methods.values() if len(v) > 1]
    return float(np.sqrt(np.mean(variances))) if variances else None


def quality_evidence(folder):
    """`[(setting, unit, std, baseline values, {candidate: values})]` from bench_quality."""
    out = []
    for name, setting, methods in quality_summary.load(folder):
        if BASELINE not in methods or "hrp" not in methods:
            continue
        runs = _runs(os.path.join(folder, f"{name}_runs.jsonl"))
        lr = methods["hrp"]["lr"]
        base_keys = [k for k in runs if k.split("|")[1] == BASELINE and k.split("|")[3] == f"lr={methods[BASELINE]['lr']}"]
        cells = {}
        for candidate, (_, options) in CANDIDATES.items():
            values = methods["hrp"]["test"] if not options else _variant_tests(runs, base_keys, options, lr)
            if values:
                cells[candidate] = [100 * v for v in values]
        task, lora = quality_summary.describe(setting)
        tests = {m: [100 * v for v in item["test"]] for m, item in methods.items()}
        out.append((f"MiniLM {task}; {lora} ([{name}]({name}.md))", "points",
                    pooled_std({BASELINE: tests[BASELINE], **cells}),
                    tests[BASELINE], cells, +1, f"MiniLM {task}"))
    return out


def lm_evidence(folder):
    """The same from bench_lm's decoder tasks (NLL: lower is better)."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "lm_*.json"))):
        name = os.path.basename(path)[: -len(".json")]
        if "_quick" in name:
            continue
        with open(path) as f:
            item = json.load(f)
        methods, setting = item["methods"], item["setting"]
        if BASELINE not in methods:
            continue
        tests = {m: v["test"] for m, v in methods.items()}
        cells = {c: tests[m] for c, (m, _) in CANDIDATES.items() if m in tests}
        grid = ", ".join(f"{lr:g}" for lr in setting["lrs"])
        lrs = (f"lr per method on validation ({grid})" if len(setting["lrs"]) > 1
               else f"lr {grid}" + (" (untuned)" if setting["lrs"][0] <= 1e-4 else ""))
        out.append((f"SmolLM2 {setting['task']}; r {setting['rank']}, {setting['targets']} linear, {lrs} "
                    f"([{name}]({name}.md))", "nats/token",
                    pooled_std({BASELINE: tests[BASELINE], **cells}), tests[BASELINE], cells, -1,
                    f"SmolLM2 {setting['task']}"))
    return out


def improvement(values, base, sign):
    """`(sign * (mean(values) - mean(base)), its standard error or None)`."""
    diff = sign * float(np.mean(values) - np.mean(base))
    if min(len(values), len(base)) < 2:
        return diff, None
    return diff, float(np.sqrt(np.var(values, ddof=1) / len(values) + np.var(base, ddof=1) / len(base)))


def choose(evidence):
    """Per candidate: `{"mean", "settings", "tasks", "worse", "eligible"}` and the chosen one."""
    summary, every_task = {}, {row[-1] for row in evidence}
    for candidate in CANDIDATES:
        scores, worse, tasks = [], 0, set()
        for _, _, std, base, cells, sign, task in evidence:
            if candidate not in cells:
                continue
            tasks.add(task)
            diff, se = improvement(cells[candidate], base, sign)
            if std:
                scores.append(diff / std)
            if se is not None and diff < -2 * se:
                worse += 1
        summary[candidate] = {"mean": float(np.mean(scores)) if scores else None, "settings": len(scores),
                              "tasks": f"{len(tasks)} / {len(every_task)}", "worse": worse,
                              "eligible": bool(scores) and worse == 0 and tasks == every_task}
    eligible = [c for c, s in summary.items() if s["eligible"]]
    return summary, max(eligible, key=lambda c: summary[c]["mean"]) if eligible else None


def _cell(values, base, sign):
    diff, se = improvement(values, base, sign)
    text = f"{diff:+.3f}" + (f" ± {se:.3f}" if se is not None else "")
    flag = " **worse**" if se is not None and diff < -2 * se else ""
    return f"{text} ({len(values)}){flag}"


def write_markdown(evidence, summary, chosen, path):
    names = list(CANDIDATES)
    lines = [
        "# Defaults from evidence",
        "",
        "`python benchmarks/defaults.py` (from the result files; runs nothing).",
        "",
        "Improvement over random-init LoRA (`keras`) ± its standard error (seeds in brackets): test accuracy "
        "points on MiniLM, held-out NLL nats/token on SmolLM2 with the sign flipped, so positive is better "
        "everywhere. **worse**: below random-init LoRA by more than two standard errors. A blank cell: that "
        "setting did not run the candidate. Std: the setting's seed-to-seed std, pooled over random-init LoRA and the candidates.",
        "",
        "| setting | unit | std | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for setting, unit, std, base, cells, sign, _ in evidence:
        row = [_cell(cells[c], base, sign) if c in cells else "" for c in names]
        lines.append(f"| {setting} | {unit} | {std:.3f} | " + " | ".join(row) + " |" if std else
                     f"| {setting} | {unit} | – | " + " | ".join(row) + " |")
    lines += [
        "",
        "| candidate | settings measured | tasks measured | mean improvement (in stds) | worse by > 2 SE "
        "| eligible |",
        "|---|---|---|---|---|---|",
    ]
    for candidate, s in summary.items():
        mean = "–" if s["mean"] is None else f"{s['mean']:+.2f}"
        lines.append(f"| {candidate} | {s['settings']} | {s['tasks']} | {mean} | {s['worse']} | "
                     f"{'yes' if s['eligible'] else 'no'} |")
    lines += ["", f"Chosen by the rule: **{chosen or 'none (no candidate is eligible)'}**.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=RESULTS, help="the folder of the result files")
    args = parser.parse_args(argv)
    evidence = quality_evidence(args.out) + lm_evidence(args.out)
    if not evidence:
        print(f"error: no result with random-init LoRA in {args.out}", file=sys.stderr)
        return 2
    summary, chosen = choose(evidence)
    write_markdown(evidence, summary, chosen, os.path.join(args.out, "defaults.md"))
    print(f"wrote {args.out}/defaults.md ({len(evidence)} settings); chosen: {chosen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
