"""How much of a LoRA step no LoRA path can change.

For each of bench_speed.py's settings interleaves four models: stock Keras
LoRA on the setting's layers, keras-hrp's fast passes on the same layers with
Keras' per-head factorization and with the standard one
(`factorization="full"`: a smaller adapter on q/k/v at the same rank, as in
PEFT), and a "floor": LoRA rank 1 on the first block's query only, so the
backward pass still runs through every block but no large weight gradient is
formed. Prints each median step and its ratio to stock: a LoRA path can at
best bring the step down to the floor.

    KERAS_BACKEND=jax python benchmarks/bench_floor.py [--quick] [--settings minilm:all]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_speed  # noqa: E402
import keras  # noqa: E402

import keras_hrp  # noqa: E402

from common import timing  # noqa: E402

FLOOR = "floor: rank 1 on the first block's query only"
KINDS = ("stock", "keras-hrp", "keras-hrp, full")
FIRST_QUERY = ".*(transformer_layer|decoder_block)_0/.*query"


def floor_model(setting, args):
    return bench_speed.model(setting, "keras-hrp", args, rank=1, targets=[FIRST_QUERY])


def main(argv=None):
    args = bench_speed.parse(argv)
    for setting in args.settings:
        steps, batch = 2, bench_speed.batch_size(setting, args)
        x, y = bench_speed.data(setting, args, batch * steps)
        models = {kind: bench_speed.model(setting, kind, args) for kind in KINDS}
        models[FLOOR] = floor_model(setting, args)
        fits = {kind: timing.fit_epoch(task, x, y, batch) for kind, task in models.items()}
        for fit in fits.values():
            fit()  # compile
        repeats = args.gemma_repeats if setting.startswith("gemma") else args.repeats
        medians = timing.medians(timing.interleaved(fits, repeats))
        print(keras.backend.backend(), setting,
              {k: f"{v * 1e3:.0f} ms, {v / medians['stock']:.3f}" for k, v in medians.items()}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
