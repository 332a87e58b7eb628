"""HRP against random-init LoRA on a synthetic low-rank regression.

A frozen linear map `W0` must learn an update `M` whose singular values decay
(a power law), through a rank-`r` LoRA adapter. Both runs take the same total
number of optimizer steps (HRP's preheat counts) from the same seeds. The
table reports the final training loss divided by the best loss any rank-`r`
update can reach (1.0 is optimal).

    KERAS_BACKEND=jax python examples/toy_regression.py
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_hrp  # noqa: E402
from keras_hrp import internals  # noqa: E402


def make_task(d, rank, decay, n, seed):
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=(d, d)) / np.sqrt(d)
    u, _ = np.linalg.qr(rng.normal(size=(d, d)))
    v, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s = np.arange(1, d + 1, dtype=float) ** -decay
    m = (u * s) @ v.T
    x = rng.normal(size=(n, d))
    y = x @ (w0 + m)
    best = (u[:, :rank] * s[:rank]) @ v[:, :rank].T
    optimal = np.mean((x @ (w0 + best) - y) ** 2)
    cast = lambda a: a.astype("float32")  # noqa: E731
    return cast(w0), cast(x), cast(y), optimal


def run(method, variant, task, args, seed):
    w0, x, y, optimal = task
    keras.utils.set_random_seed(seed)
    d = w0.shape[0]
    if method == "hrp":
        layer = keras_hrp.HRPDense(
            d, rank=args.rank, preheat_rank=args.preheat_rank, variant=variant, use_bias=False
        )
    else:
        layer = keras_hrp.HRPDense(d, rank=args.rank, variant=variant, use_bias=False)
    model = keras.Sequential([keras.Input((d,)), layer])
    internals.base_weight(layer).assign(w0)
    model.compile(keras.optimizers.Adam(args.lr), "mse")
    callbacks = [keras_hrp.HRPCallback(args.preheat_steps, verbose=0)] if method == "hrp" else []
    start = time.perf_counter()
    history = model.fit(  # one epoch of exactly `steps` batches
        x, y, batch_size=args.batch_size, epochs=1, callbacks=callbacks, verbose=0
    )
    seconds = time.perf_counter() - start
    loss = float(np.mean((model.predict(x, verbose=0, batch_size=1024) - y) ** 2))
    return loss / optimal, seconds, history.history["loss"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--preheat-rank", type=int, default=32)
    parser.add_argument("--preheat-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--decay", type=float, default=1.5, help="singular values i^-decay")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()

    print(f"backend {keras.backend.backend()}: d={args.dim}, r={args.rank}, "
          f"R={args.preheat_rank}, {args.steps} steps ({args.preheat_steps} preheat), "
          f"spectrum i^-{args.decay}, {args.seeds} seeds")
    print(f"{'variant':12s} {'init':8s} {'loss / optimal rank-r loss':>28s} {'seconds':>8s}")
    for variant in ("classic", "asymmetric"):
        for method in ("random", "hrp"):
            ratios, times = [], []
            for seed in range(args.seeds):
                task = make_task(args.dim, args.rank, args.decay, args.steps * args.batch_size, seed)
                ratio, seconds, _ = run(method, variant, task, args, seed)
                ratios.append(ratio)
                times.append(seconds)
            print(f"{variant:12s} {method:8s} {np.mean(ratios):20.3f} ± {np.std(ratios):5.3f} "
                  f"{np.mean(times):8.2f}")


if __name__ == "__main__":
    main()
