"""Core benchmarks: SVD of a product, training step time, switch time.

Every speed figure is a ratio against a baseline measured in the same run,
with the two interleaved and summarized by medians (these machines are
noisy). Writes `benchmarks/results/core_<backend>.md`.

    KERAS_BACKEND=jax python benchmarks/bench_core.py [--quick]
"""

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import keras_hrp  # noqa: E402

from common import timing  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _synced(fn):
    """`fn` run to completion: its (first) output brought to the host."""
    out = fn()
    ops.convert_to_numpy(out[0] if isinstance(out, (tuple, list)) else out)


def bench_svd(sizes, rank, repeats):
    rows = []
    for n in sizes:
        rng = np.random.default_rng(0)
        a = ops.convert_to_tensor(rng.normal(size=(n, rank)).astype("float32"))
        b = ops.convert_to_tensor(rng.normal(size=(rank, n)).astype("float32"))
        ours = lambda: keras_hrp.svd_of_product(a, b, rank)  # noqa: E731
        dense = lambda: ops.svd(ops.matmul(a, b), full_matrices=False)  # noqa: E731
        _synced(ours), _synced(dense)  # warm up (compiles, allocations)
        runs = {"ours": lambda: _synced(ours), "dense": lambda: _synced(dense)}
        times = timing.medians(timing.interleaved(runs, repeats))
        m_ours, m_dense = times["ours"], times["dense"]
        rows.append((f"{n}x{n}, R={rank}", m_dense, m_ours, m_dense / m_ours))
        print(f"svd {n}: dense {m_dense:.4f}s ours {m_ours:.5f}s x{m_dense / m_ours:.1f}", flush=True)
    return rows


def _mlp(width, depth, layer_fn):
    inputs = keras.Input((width,))
    h = inputs
    for i in range(depth):
        h = layer_fn(i)(h)
    return keras.Model(inputs, keras.layers.Dense(10)(h))


def _step_models(width, depth, rank, preheat_rank, n):
    x = np.random.default_rng(0).normal(size=(n, width)).astype("float32")
    y = np.random.default_rng(1).normal(size=(n, 10)).astype("float32")

    def stock():
        model = _mlp(width, depth, lambda i: keras.layers.Dense(width, activation="relu", name=f"d{i}"))
        for i in range(depth):
            model.get_layer(f"d{i}").enable_lora(rank)
        return model

    hrp = _mlp(width, depth, lambda i: keras_hrp.HRPDense(
        width, rank=rank, preheat_rank=preheat_rank, activation="relu", name=f"d{i}"))
    models = {"stock": stock(), "stock, 2nd instance": stock(), "HRPDense after the switch": hrp}
    for model in models.values():
        model.compile(keras.optimizers.Adam(1e-3), "mse")
    hrp.fit(x[:128], y[:128], batch_size=64, epochs=1, verbose=0,
            callbacks=[keras_hrp.HRPCallback(2, verbose=0)])
    assert hrp.layers[1].lora_rank == rank
    return models, x, y


def bench_step(width, depth, rank, preheat_rank, repeats, steps):
    """Median step time of each model; the 2nd stock instance shows the noise."""
    batch = 64
    models, x, y = _step_models(width, depth, rank, preheat_rank, batch * steps)

    def epoch(model):
        return lambda: model.fit(x, y, batch_size=batch, epochs=1, verbose=0).history["loss"]

    for model in models.values():
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # compile
    medians = timing.medians(timing.interleaved({k: epoch(m) for k, m in models.items()}, repeats), steps)
    print("step:", {k: f"{v * 1e3:.2f} ms" for k, v in medians.items()}, flush=True)
    return medians


def bench_switch(width, depth, rank, preheat_rank):
    model = _mlp(width, depth, lambda i: keras_hrp.HRPDense(
        width, rank=rank, preheat_rank=preheat_rank, activation="relu", name=f"d{i}"))
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    x = np.random.default_rng(0).normal(size=(256, width)).astype("float32")
    y = np.random.default_rng(1).normal(size=(256, 10)).astype("float32")
    snapshot = keras_hrp.WeightSnapshot(model)
    start = time.perf_counter()
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    preheat = time.perf_counter() - start
    report = keras_hrp.switch_to_main(model, snapshot)
    start = time.perf_counter()
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    main_epoch = time.perf_counter() - start
    print(f"switch of {depth} layers: {report.seconds:.3f}s (first epoch after it {main_epoch:.3f}s)", flush=True)
    return report.seconds, preheat, main_epoch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    args = parser.parse_args()
    backend = keras.backend.backend()
    sizes = [1024, 2048] if args.quick else [1024, 2048, 4096]
    repeats = 3 if args.quick else 7
    width, depth, rank, preheat_rank = (256, 4, 8, 64) if args.quick else (512, 8, 8, 64)
    switch_depth = 16 if args.quick else 64

    svd_rows = bench_svd(sizes, 64, repeats)
    steps = bench_step(width, depth, rank, preheat_rank, 2 * repeats + 1, steps=32)
    switch_s, preheat_s, main_s = bench_switch(256, switch_depth, rank, preheat_rank)

    lines = [
        f"# Core benchmark, backend `{backend}`{' (quick)' if args.quick else ''}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores visible; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; keras {keras.__version__}.",
        f"Command: `KERAS_BACKEND={backend} OMP_NUM_THREADS=1 python benchmarks/bench_core.py"
        f"{' --quick' if args.quick else ''}`",
        "",
        "## svd_of_product vs dense SVD of the product (median seconds)",
        "",
        "| in x out, R | dense SVD | svd_of_product | speed-up |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {d:.4f} | {o:.5f} | {r:.0f}x |" for name, d, o, r in svd_rows]
    lines += [
        "",
        f"## Training step after the switch ({depth} x Dense({width}), rank {rank}, batch 64)",
        "",
        "Stock = `Dense` + `enable_lora(rank)`; a second stock instance shows the noise.",
        "",
        "| model | median step (ms) | ratio to stock |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name} | {t * 1e3:.2f} | {t / steps['stock']:.3f} |" for name, t in steps.items()
    ]
    lines += [
        "",
        f"## The switch itself ({switch_depth} x HRPDense(256), R={preheat_rank} -> r={rank})",
        "",
        "| switch (s) | per layer (ms) | preheat epoch, 4 steps incl. compile (s) | first main epoch incl. recompile (s) |",
        "|---|---|---|---|",
        f"| {switch_s:.3f} | {switch_s / switch_depth * 1e3:.1f} | {preheat_s:.3f} | {main_s:.3f} |",
        "",
    ]
    os.makedirs(RESULTS, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    path = os.path.join(RESULTS, f"core_{backend}{suffix}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
