"""Baseline LoRA initializations, as pure functions of the frozen weight.

Each takes the weight as an `(m, n)` matrix `w`, the rank `r` and the LoRA
scale `s`, and returns `(a, b, residual)`: the adapter factors and the new
frozen weight, with `residual + s * a @ b == w`, so the model's output is
unchanged at initialization. `residual is None` means `w` stays as it is.
"""

import math

from keras import ops


def _weight(w, rank):
    w = ops.convert_to_tensor(w, dtype="float32")
    m, n = w.shape
    if not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise ValueError(
            f"LoRA initializer: `rank` must be in [1, {min(m, n)}] for a weight of "
            f"shape {(m, n)}. Received: rank={rank}"
        )
    return w


def _split_singular(u, s, vt, scale):
    """`a`, `b` with `scale * a @ b == u @ diag(s) @ vt`, balanced halves."""
    root = ops.sqrt(s / scale)
    return u * root, ops.expand_dims(root, 1) * vt


def pissa(w, rank, scale=1.0):
    """PiSSA: the top-`rank` singular triplets of `w` go into the adapter.

    Modifies the base weight: it keeps the residual `w - U_r S_r V_r^T`.
    """
    w = _weight(w, rank)
    u, s, vt = ops.svd(w, full_matrices=False)
    a, b = _split_singular(u[:, :rank], s[:rank], vt[:rank], scale)
    return a, b, w - scale * ops.matmul(a, b)


def milora(w, rank, scale=1.0):
    """MiLoRA: the bottom-`rank` singular triplets of `w` go into the adapter.

    Modifies the base weight: it keeps the residual.
    """
    w = _weight(w, rank)
    u, s, vt = ops.svd(w, full_matrices=False)
    k = s.shape[0]
    a, b = _split_singular(u[:, k - rank :], s[k - rank :], vt[k - rank :], scale)
    return a, b, w - scale * ops.matmul(a, b)


def olora(w, rank, scale=1.0):
    """OLoRA: `w = QR`; the adapter starts at `Q_r`, `R_r / scale`.

    Modifies the base weight: it keeps `w - Q_r R_r`.
    """
    w = _weight(w, rank)
    q, r = ops.qr(w, mode="reduced")
    a, b = q[:, :rank], r[:rank] / scale
    return a, b, w - scale * ops.matmul(a, b)


def gaussian(w, rank, scale=1.0, stddev=None, seed=None):
    """`A ~ N(0, 1/rank)` (or `stddev`), `B = 0`; the base weight is kept."""
    import keras

    w = _weight(w, rank)
    stddev = 1.0 / math.sqrt(rank) if stddev is None else stddev
    a = keras.random.normal((w.shape[0], rank), stddev=stddev, seed=seed)
    return a, ops.zeros((rank, w.shape[1])), None
