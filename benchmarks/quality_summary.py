"""Every `bench_quality.py` setting in one table and one plot: HRP and the
best other init against random-init LoRA, from the result files.

Reads `results/quality_*.json` (each written with its setting by
`bench_quality.py`) and writes `results/quality_summary.md` and `.png`.
Runs nothing.

    python benchmarks/quality_summary.py
"""

import argparse
import glob
import json
import os
import sys
import textwrap

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import plots  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BASELINE, HRP, FULL = "keras", "hrp", "full"


def load(folder):
    """`[(name, setting, methods)]` of the result files in `folder`."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "quality_*.json"))):
        name = os.path.basename(path)[: -len(".json")]
        with open(path) as f:
            item = json.load(f)
        if "_quick" in name or "setting" not in item:
            continue
        out.append((name, item["setting"], item["methods"]))
    return out


def describe(setting):
    """One line: the task and what differs from the default setting."""
    task = setting["task"] + (", head-free" if setting["objective"] == "prototypes" else ", new head")
    lora = [f"r {setting['rank']}", "q/v" if setting["targets"] == "qv" else "all linear",
            setting["factorization"].replace("_", " "), f"R {setting['preheat_rank']}"]
    if setting["probe_steps"]:
        lora.append(f"linear probe {setting['probe_steps']} steps at {setting['probe_lr']:g}")
    return task, ", ".join(lora)


def difference(a, b):
    """`(mean(a) - mean(b), its standard error or None)` in points."""
    diff = 100 * (np.mean(a) - np.mean(b))
    if min(len(a), len(b)) < 2:
        return diff, None
    return diff, 100 * float(np.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b)))


def rows(results):
    """Per setting: the cells of the table and the differences to plot."""
    out = []
    for name, setting, methods in results:
        if BASELINE not in methods or HRP not in methods:
            continue
        base = methods[BASELINE]["test"]
        others = {m: v for m, v in methods.items() if m not in (BASELINE, HRP, FULL)}
        best = max(others, key=lambda m: np.mean(others[m]["test"])) if others else None
        out.append({
            "name": name, "setting": describe(setting),
            "cells": {m: methods[m]["test"] for m in methods},
            "hrp": difference(methods[HRP]["test"], base),
            "best": (best, *difference(others[best]["test"], base)) if best else None,
        })
    return out


def _cell(values):
    if values is None:
        return "–"
    mean = 100 * np.mean(values)
    return f"{mean:.2f} ± {100 * np.std(values):.2f} ({len(values)})" if len(values) > 1 else f"{mean:.2f} (1)"


def _diff(diff, se):
    return f"{diff:+.2f}" + (f" ± {se:.2f}" if se is not None else " (1 seed)")


def write_markdown(table, path, png):
    lines = [
        "# Quality: every setting, HRP and the best other init against random-init LoRA",
        "",
        "`python benchmarks/quality_summary.py` (from the result files of `bench_quality.py`; each "
        "setting's own file has its command, learning rates and loss curves).",
        "",
        "Test accuracy %, mean ± std (seeds). Differences in points with their standard error "
        "(the sample std / √seeds, both sides); a single seed has none: one run's seed-to-seed std here is "
        "0.1 to 0.8 points and the test split's sampling error about ±0.6.",
        "",
        "| task | LoRA setting | random-init LoRA | HRP | HRP − random | best other init | best − random "
        "| full fine-tuning | file |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        task, lora = row["setting"]
        best = row["best"]
        lines.append(
            f"| {task} | {lora} | {_cell(row['cells'][BASELINE])} | {_cell(row['cells'][HRP])} | "
            f"{_diff(*row['hrp'])} | "
            + (f"{best[0]} {_cell(row['cells'][best[0]])} | {_diff(*best[1:])}" if best else "– | –")
            + f" | {_cell(row['cells'].get(FULL))} | [{row['name']}]({row['name']}.md) |"
        )
    lines += ["", f"![differences]({os.path.basename(png)})", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(table, path):
    fig, ax = plots.figure(10, 0.55 * len(table) + 1.5)
    y = np.arange(len(table))
    labels = [row["setting"][0] + "\n" + textwrap.fill(row["setting"][1], 30) for row in table]
    for offset, key, label, color in ((-0.18, "hrp", "HRP", "tab:blue"), (0.18, "best", "best other init", "tab:orange")):
        diffs = [(row[key][-2], row[key][-1]) if row[key] else (np.nan, None) for row in table]
        errors = [2 * se if se is not None else 0.0 for _, se in diffs]
        hatches = ["" if se is not None else "//" for _, se in diffs]  # one seed: no standard error
        bars = ax.barh(y + offset, [d for d, _ in diffs], height=0.34, xerr=errors, label=label, capsize=2,
                       color=color, edgecolor="white")
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy − random-init LoRA's (points; whiskers: ± 2 standard errors; "
                  "hatched: one seed, none)")
    ax.legend(fontsize=8)
    plots.save(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=RESULTS, help="the folder of the result files")
    args = parser.parse_args(argv)
    table = rows(load(args.out))
    if not table:
        print(f"error: no bench_quality result with random-init LoRA and HRP in {args.out}", file=sys.stderr)
        return 2
    png = os.path.join(args.out, "quality_summary.png")
    plot(table, png)
    write_markdown(table, os.path.join(args.out, "quality_summary.md"), png)
    print(f"wrote {args.out}/quality_summary.md and .png ({len(table)} settings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
