"""A 7B-shaped HRP switch: 64 adapted 4096 x 4096 matrices, R = 64 -> r = 8.

The q and v projections of a 32-block, 4096-wide decoder (Llama-2-7B's
shapes), as 64 frozen `Dense(4096)` layers in a chain, adapted with
`enable_hrp(rank=8, preheat_rank=64)` (the frozen kernels are created
without an optimizer, bf16 where the backend trains in it on CPU). Two
preheat steps, then `switch_to_main` is timed, and the peak resident memory
during it is measured above the memory before it (Linux `VmHWM`, reset just
before the switch): the switch works on the factors only, so the target is
less than one frozen matrix.

`--model smollm`: the 210 linear layers of SmolLM2-135M's shapes (a KerasHub
Llama3 backbone with random weights, built from the embedded GGUF's
metadata) under the library's default `enable_hrp(rank=8, preheat_rank=32)`,
whose ranks the preheated spectra spread; each preheated `B` is set to a
random matrix with a decaying spectrum instead of trained, and only the
switch is timed.

    KERAS_BACKEND=jax python benchmarks/bench_switch.py [--quick] [--model smollm]
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


def switch_smollm():
    """The switch of the decoder's 210 layers at spread ranks (see above)."""
    import keras_hub

    from common import smollm

    backend = keras.backend.backend()
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Llama3Backbone(**smollm.backbone_arguments(smollm.read_metadata()))
    layers = keras_hrp.enable_hrp(backbone, rank=8, preheat_rank=32,
                                  target_layer_names=keras_hrp.hub.LINEAR_LAYER_NAMES["llama"])
    rng = np.random.default_rng(0)
    for layer in layers:
        b = layer.lora_kernel_b
        decay = 0.8 ** np.arange(b.shape[0])[:, None] * (1 + rng.random())
        b.assign((rng.standard_normal(b.shape) * decay).astype("float32"))
    report = keras_hrp.switch_to_main(backbone)
    ranks = [item.to_rank for item in report.values()]
    assert len(report) == 210 and not report.fallbacks
    lines = [
        f"# The switch of SmolLM2-135M's 210 linear layers at spread ranks, backend `{backend}`",
        "",
        f"`KERAS_BACKEND={backend} python benchmarks/bench_switch.py --model smollm`; "
        f"{timing.machine(backend, keras.__version__)}. Random weights of the real shapes; "
        "`enable_hrp(rank=8, preheat_rank=32)` (ranks spread by the spectra, the default); preheated `B` "
        "random with a decaying spectrum.",
        "",
        "| switch wall time (s) | per layer (ms) | ranks | distinct ranks |",
        "|---|---|---|---|",
        f"| **{report.seconds:.2f}** | {report.seconds / len(report) * 1e3:.1f} | {min(ranks)}..{max(ranks)} "
        f"| {len(set(ranks))} |",
        "",
    ]
    return lines, f"switch_smollm_{backend}.md"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 blocks of 1024")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--preheat-rank", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", help="the frozen weights' dtype")
    parser.add_argument("--model", choices=["chain", "smollm"], default="chain",
                        help="the 7B-shaped chain, or the real decoder's shapes at spread ranks")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks, args.width = 8, 1024
    if args.model == "smollm":
        lines, name = switch_smollm()
        return _write(lines, args.out, name)
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
    return _write(lines, args.out, f"switch_{backend}{'_quick' if args.quick else ''}.md")


def _write(lines, out, name):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
