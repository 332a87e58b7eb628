"""A 7B-shaped HRP switch: 64 adapted 4096 x 4096 matrices, R = 64 -> r = 8.

The q and v projections of a 32-block, 4096-wide decoder (Llama-2-7B's
shapes), as 64 frozen `Dense(4096)` layers in a chain, adapted with
`enable_hrp(rank=8, preheat_rank=64)` (the frozen kernels are created
without an optimizer, bf16 where the backend trains in it on CPU). Two
preheat steps, then `switch_to_main` is timed, and the peak resident memory
during it is measured above the memory before it (Linux `VmHWM`, reset just
before the switch): the switch works on the factors only, so the target is
less than one frozen matrix.

    KERAS_BACKEND=jax python benchmarks/bench_switch.py [--quick]
"""

import argparse
import gc
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_hrp  # noqa: E402
import keras_hrp.lora  # noqa: E402

from common import timing  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build(args):
    """The chain of frozen layers, adapted and compiled."""
    inputs = keras.Input((args.width,), dtype=args.dtype)
    h = inputs
    for block in range(args.blocks):
        for name in ("q", "v"):
            h = keras.layers.Dense(args.width, use_bias=False, dtype=args.dtype,
                                   kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                                   name=f"block_{block}_{name}")(h)
    model = keras.Model(inputs, h)
    keras_hrp.enable_hrp(model, rank=args.rank, preheat_rank=args.preheat_rank,
                         target_layer_names=[r"block_\d+_[qv]"], rank_allocation="uniform")
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 blocks of 1024")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--preheat-rank", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", help="the frozen weights' dtype")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks, args.width = 8, 1024
    backend = keras.backend.backend()

    start = time.perf_counter()
    model = build(args)
    built_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, args.width)).astype("float32")
    snapshot = keras_hrp.WeightSnapshot(model)
    model.fit(x, x, batch_size=2, epochs=1, verbose=0)  # two preheat steps
    gc.collect()
    matrix_mib = args.width**2 * np.dtype(keras.backend.standardize_dtype(model.layers[1].kernel.dtype).replace("bfloat16", "float16")).itemsize / 2**20
    rest = timing.rss_mib()
    timing.reset_peak()
    report = keras_hrp.switch_to_main(model, snapshot)
    above = timing.peak_rss_mib() - rest
    adapters_mib = sum(sum(keras_hrp.lora.weight_matrix_shape(layer)) * args.rank * 4  # float32 A and B
                       for layer in keras_hrp.hrp_layers(model)) / 2**20
    ranks = {item.to_rank for item in report.values()}
    assert ranks == {args.rank} and len(report) == 2 * args.blocks and not report.fallbacks
    start = time.perf_counter()
    model.fit(x, x, batch_size=2, epochs=1, verbose=0)  # the main phase trains
    main_s = time.perf_counter() - start

    quick = " --quick" if args.quick else ""
    lines = [
        f"# The switch of {2 * args.blocks} matrices {args.width} x {args.width}, "
        f"R={args.preheat_rank} -> r={args.rank}, backend `{backend}`{quick}",
        "",
        f"`KERAS_BACKEND={backend} python benchmarks/bench_switch.py{quick}`; "
        f"{timing.machine(backend, keras.__version__)}. Frozen weights in {args.dtype}, "
        f"adapters float32; model built in {built_s:.1f} s, resident {rest:.0f} MiB before the switch.",
        "",
        "| switch wall time (s) | per layer (ms) | peak above the memory before the switch (MiB) "
        "| of it, the new rank-r adapters (MiB) | the rest: temporaries (MiB) | one frozen matrix (MiB) "
        "| first main epoch, 2 steps incl. recompile (s) |",
        "|---|---|---|---|---|---|---|",
        f"| **{report.seconds:.2f}** | {report.seconds / len(report) * 1e3:.1f} | {above:.1f} | "
        f"{adapters_mib:.1f} | **{above - adapters_mib:.1f}** | {matrix_mib:.0f} | {main_s:.2f} |",
        "",
        "The new adapters are made before the old rank-R ones (and their optimizer slots) are "
        "released, once, after the last layer; the fresh optimizer's slots come after that release.",
        "",
    ]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"switch_{backend}{'_quick' if args.quick else ''}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
