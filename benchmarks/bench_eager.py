"""What an unmerged LoRA step costs in eager PyTorch, with and without fusion.

One layer's matrix products for one training step, written in plain torch
(no Keras): the frozen layer (`x W` and `dy W^T`); the unmerged adapter as
keras-hrp computes it (`x W + s (x A) B`, `dy W^T + (dy B^T) A^T`, `dA`,
`dB`), each sum a separate op; the same with each sum fused into its
product (`addmm_`, a GEMM that accumulates into its output, which
`keras.ops` cannot express); and the merged form (`x K`, `dy K^T`, `K`
formed once). Eager PyTorch runs each op as written, so the ratios to the
frozen layer are the cost of a LoRA pass that no Keras-level rewrite can
remove on this backend; XLA fuses the sums on its own.

    python benchmarks/bench_eager.py [--quick]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import timing  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# name: (tokens, input width, output width)
SHAPES = {
    "Gemma-shaped MLP": (512, 1024, 4096),
    "Gemma-shaped MLP down": (512, 4096, 1024),
    "Gemma-shaped q (8 heads x 128)": (512, 1024, 1024),
    "MiniLM MLP in": (1536, 384, 1536),
}
FORMS = ("frozen", "unmerged", "unmerged, sums fused", "merged")


def step(form, x, w, a, b, dy):
    """The products of one step of `form`; returns `(y, dx)`."""
    if form == "frozen":
        return x @ w, dy @ w.T
    if form == "merged":
        kernel = w + a @ b
        y, dx = x @ kernel, dy @ kernel.T
        g = dy @ b.T
        return y, dx, x.T @ g, (x @ a).T @ dy
    low, g = x @ a, dy @ b.T
    if form == "unmerged":
        y, dx = x @ w + low @ b, dy @ w.T + g @ a.T
    else:
        y, dx = (x @ w).addmm_(low, b), (dy @ w.T).addmm_(g, a.T)
    return y, dx, x.T @ g, low.T @ dy


def bench(shape, rank, repeats):
    tokens, m, n = shape
    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(tokens, m, generator=gen), torch.randn(tokens, n, generator=gen)
    w = torch.randn(m, n, generator=gen) / m**0.5
    a, b = torch.randn(m, rank, generator=gen) / m**0.5, torch.randn(rank, n, generator=gen) * 0.01
    runs = {form: (lambda form=form: step(form, x, w, a, b, dy)) for form in FORMS}
    return timing.medians(timing.interleaved(runs, repeats))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, few repeats")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    shapes = {"tiny": (64, 32, 48)} if args.quick else SHAPES
    repeats = 3 if args.quick else args.repeats
    threads = torch.get_num_threads()
    lines = [
        "# One LoRA step's matrix products in eager PyTorch",
        "",
        f"`python benchmarks/bench_eager.py{' --quick' if args.quick else ''}`; torch {torch.__version__}, "
        f"{threads} threads, float32, rank {args.rank}; {repeats} interleaved repeats, medians.",
        "",
        "| layer | tokens x in x out | frozen (ms) | " + " | ".join(f"{f} / frozen" for f in FORMS[1:]) + " |",
        "|---|---|---|" + "---|" * (len(FORMS) - 1),
    ]
    for name, shape in shapes.items():
        medians = bench(shape, args.rank, repeats)
        frozen = medians["frozen"]
        cells = " | ".join(f"{medians[f] / frozen:.3f}" for f in FORMS[1:])
        lines.append(f"| {name} | {' x '.join(map(str, shape))} | {frozen * 1e3:.2f} | {cells} |")
        print(lines[-1], flush=True)
    lines.append("")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"eager_torch{'_quick' if args.quick else ''}.md"), "w") as f:
        f.write("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
