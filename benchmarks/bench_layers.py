"""One adapted layer: stock Keras LoRA vs keras-hrp's passes, per form.

Each shape is one frozen layer with a rank-8 adapter after a trainable scale
(so its input's gradient is needed, as inside a network), trained with SGD.
Step times of stock `enable_lora`, keras-hrp's chosen form ("auto"), each
form forced (unmerged `x W + s (x A) B`; merged `x K` with factored
gradients) and the layer without an adapter ("frozen": its input's gradient
only, the per-layer floor no LoRA path can beat) are interleaved and
summarized by medians, as ratios to stock in the same run. `keras_hrp.fast_lora` picks the merged form when the tokens
reach `2 m n / (m + n)` for an `m x n` weight; this benchmark is where that
threshold comes from, and where it can be checked on other hardware.

    KERAS_BACKEND=jax python benchmarks/bench_layers.py [--quick] [--set gpu] [--dtype bfloat16]
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_hrp import fast_lora  # noqa: E402
from keras_hrp import internals  # noqa: E402

from common import timing  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# name: (equation or "dense", output shape, input width, batch, sequence)
SETS = {
    "cpu": {
        "MiniLM q (per head)": ("abc,cde->abde", (12, 32), 384, 32, 48),
        "MiniLM MLP in": ("dense", (1536,), 384, 32, 48),
        "Gemma-shaped q (per head)": ("btd,ndh->btnh", (8, 128), 1024, 1, 512),
        "Gemma-shaped k / v (one head)": ("btd,ndh->btnh", (1, 128), 1024, 1, 512),
        "Gemma-shaped MLP": ("dense", (4096,), 1024, 1, 512),
        "Gemma-shaped MLP down": ("dense", (1024,), 4096, 1, 512),
        "1024 x 1024, 1,024 tokens": ("dense", (1024,), 1024, 2, 512),
        "1024 x 1024, 4,096 tokens": ("dense", (1024,), 1024, 8, 512),
    },
    "gpu": {
        "Llama-7B q (per head), 8k tokens": ("btd,ndh->btnh", (32, 128), 4096, 8, 1024),
        "Llama-7B MLP up, 8k tokens": ("dense", (11008,), 4096, 8, 1024),
        "Llama-7B MLP up, 1k tokens": ("dense", (11008,), 4096, 1, 1024),
        "Gemma-2B MLP up, 8k tokens": ("dense", (16384,), 2048, 8, 1024),
    },
}
FORMS = ("auto", "unmerged", "merged")
FROZEN = "frozen"


class Scale(keras.layers.Layer):
    def build(self, input_shape):
        self.scale = self.add_weight(shape=(), initializer="ones")

    def call(self, x):
        return x * keras.ops.cast(self.scale, x.dtype)


def _forced(original):
    """`prefers_merged`, overridden by a layer's `bench_form` (benchmark only)."""

    def prefers_merged(layer, *args):
        form = getattr(layer, "bench_form", "auto")
        if form == "auto":
            return original(layer, *args)
        return form == "merged" and not internals.base_weight(layer).trainable

    return prefers_merged


def _model(spec, kind, dtype):
    equation, out, width, batch, seq = spec
    if equation == "dense":
        layer = keras.layers.Dense(out[-1], dtype=dtype)
    else:
        layer = keras.layers.EinsumDense(equation, (seq, *out), dtype=dtype)
    inputs = keras.Input((seq, width), dtype=dtype)
    model = keras.Model(inputs, layer(Scale(dtype=dtype)(inputs)))
    if kind == FROZEN:
        layer.trainable = False
    else:
        layer.enable_lora(8)
    if kind in FORMS:
        fast_lora.use_fast_lora(layer)
        layer.bench_form = kind
    model.compile(keras.optimizers.SGD(1e-3), "mse")
    return model, layer


def bench(spec, args):
    equation, out, width, batch, seq = spec
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * args.steps, seq, width)).astype("float32")
    runs, layers = {}, {}
    for kind in ("stock", *FORMS, FROZEN):
        model, layers[kind] = _model(spec, kind, args.dtype)
        y = np.zeros((len(x), *model.output_shape[1:]), "float32")

        def fit(model=model, y=y):
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0)

        fit()  # compile
        runs[kind] = fit
    medians = timing.medians(timing.interleaved(runs, args.repeats), args.steps)
    kernel = internals.base_weight(layers["auto"])
    axes = getattr(layers["auto"], "equation", "ab,bc->ac").split("->")[0].split(",")
    contracted = [c in axes[0] for c in axes[1]] if equation != "dense" else [True, False]
    chose = "merged" if fast_lora.prefers_merged(layers["auto"], (batch, seq, width), kernel.shape,
                                                  contracted) else "unmerged"
    return medians, chose, batch * seq


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two CPU shapes, few repeats")
    parser.add_argument("--set", choices=sorted(SETS), default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    shapes = SETS[args.set]
    if args.quick:
        shapes = dict(list(SETS["cpu"].items())[:2])
        args.steps, args.repeats = 2, 3
    fast_lora.prefers_merged = _forced(fast_lora.prefers_merged)
    backend = keras.backend.backend()
    device = "GPU" if args.set == "gpu" else "CPU"
    lines = [
        f"# One adapted layer, backend `{backend}`, {device}, {args.dtype}",
        "",
        f"`KERAS_BACKEND={backend} python benchmarks/bench_layers.py --set {args.set} --dtype {args.dtype}"
        f"{' --quick' if args.quick else ''}`; {timing.machine(backend, keras.__version__)}. Rank 8, "
        f"SGD; {args.steps}-step epochs interleaved, {args.repeats} repeats, medians.",
        "",
        "| layer | tokens | stock (ms) | keras-hrp auto / stock | unmerged / stock | merged / stock | auto chose "
        "| frozen / stock | keras-hrp auto / frozen |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, spec in shapes.items():
        medians, chose, tokens = bench(spec, args)
        stock = medians["stock"]
        lines.append(f"| {name} | {tokens:,} | {stock * 1e3:.2f} | **{medians['auto'] / stock:.3f}** | "
                     f"{medians['unmerged'] / stock:.3f} | {medians['merged'] / stock:.3f} | {chose} | "
                     f"{medians[FROZEN] / stock:.3f} | {medians['auto'] / medians[FROZEN]:.3f} |")
        print(lines[-1], flush=True)
    lines.append("")
    os.makedirs(args.out, exist_ok=True)
    suffix = f"_{args.set}_{args.dtype}{'_quick' if args.quick else ''}"
    with open(os.path.join(args.out, f"layers_{backend}{suffix}.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
