"""The preheated spectra of a switch, as a picture and as TensorBoard scalars.

A `SwitchReport` keeps, per layer, the singular values of the preheated delta
and the share of its energy (squared singular values) that the main rank
keeps. A fast-decaying spectrum (high energy kept) is where HRP's start is
expected to help; a flat one says the preheat found no dominant directions.
"""

import os

import numpy as np


def normalized_spectra(report):
    """Per layer path, the singular values divided by the largest, or `None`
    for a layer that fell back (its spectrum is not meaningful)."""
    out = {}
    for path, item in report.items():
        s = np.asarray(item.singular_values, dtype="float64")
        out[path] = None if item.fallback or not s.size or s[0] <= 0 else s / s[0]
    return out


def plot_spectra(report, path):
    """Writes a PNG: each layer's normalized preheated spectrum (left, the
    main rank marked) and the energy it keeps (right). Returns `path`.

    Needs matplotlib (`pip install matplotlib`).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot_spectra needs matplotlib: pip install matplotlib") from error
    spectra = normalized_spectra(report)
    paths = list(report)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4 + 0.12 * len(paths)))
    for s in spectra.values():
        if s is not None:
            left.semilogy(np.arange(1, s.size + 1), np.maximum(s, 1e-12), lw=1, alpha=0.7)
    ranks = sorted({item.to_rank for item in report.values()})
    for rank in ranks:
        left.axvline(rank, color="k", ls="--", lw=0.8)
    left.set(xlabel="singular value index", ylabel="σ_i / σ_1",
             title=f"preheated spectra ({len(paths)} layers; dashed: main rank {', '.join(map(str, ranks))})")
    energy = [report[p].energy if not report[p].fallback else 0.0 for p in paths]
    right.barh(range(len(paths)), energy, color=["tab:red" if report[p].fallback else "tab:blue" for p in paths])
    right.set_yticks(range(len(paths)), [p[-40:] for p in paths], fontsize=6)
    right.invert_yaxis()
    right.set(xlim=(0, 1), xlabel="energy kept by the main rank", title="energy kept (red: fell back)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_tensorboard(report, log_dir, step):
    """Writes the report to TensorBoard under `log_dir`: per layer, the energy
    kept (`hrp/energy_kept/<layer>` at `step`) and the normalized spectrum
    (`hrp/spectrum/<layer>`, one point per singular value index). Needs
    TensorFlow (as Keras' TensorBoard callback does)."""
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError("write_tensorboard needs tensorflow (as keras.callbacks.TensorBoard does)") from error
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        for path, s in normalized_spectra(report).items():
            item = report[path]
            if not item.fallback:
                tf.summary.scalar(f"hrp/energy_kept/{path}", item.energy, step=step)
            for i, value in enumerate(() if s is None else s, start=1):
                tf.summary.scalar(f"hrp/spectrum/{path}", value, step=i)
    writer.flush()
    writer.close()
    return log_dir
