"""How much of a Gemma-shaped LoRA step no LoRA path can change.

Interleaves three models of bench_speed.py's `gemma:all` setting: stock Keras
LoRA on every linear layer, keras-hrp's fast passes on the same layers, and a
"floor": LoRA rank 1 on block 0's query only, so the backward pass still runs
through every block but no large weight gradient is formed. Prints each
median step and its ratio to stock.

    KERAS_BACKEND=jax python benchmarks/bench_floor.py [--quick]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_speed  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import timing  # noqa: E402

import keras_hrp  # noqa: E402

FLOOR = "floor: rank 1 on block 0's query only"


def floor_model(args):
    backbone = keras_hub.models.GemmaBackbone(vocabulary_size=args.vocab, dtype=args.dtype, **bench_speed.GEMMA)
    task = keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
    keras_hrp.enable_hrp(task, rank=1, preheat_rank=None, target_layer_names=["decoder_block_0/attention/query"])
    task.compile(optimizer=keras.optimizers.Adam(1e-4),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return task


def main(argv=None):
    args = bench_speed.parse(argv)
    setting, steps = "gemma:all", 2
    x, y = bench_speed.data(setting, args, args.gemma_batch_size * steps)
    models = {kind: bench_speed.model(setting, kind, args) for kind in ("stock", "keras-hrp")}
    models[FLOOR] = floor_model(args)
    fits = {k: (lambda m=m: keras.Model.fit(m, x, y, batch_size=args.gemma_batch_size, epochs=1, verbose=0))
            for k, m in models.items()}
    for fit in fits.values():
        fit()  # compile
    medians = timing.medians(timing.interleaved(fits, args.gemma_repeats), steps)
    print(keras.backend.backend(), {k: f"{v * 1e3:.0f} ms, {v / medians['stock']:.3f}" for k, v in medians.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
