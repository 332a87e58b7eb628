"""Baseline LoRA initializations, as pure functions of the frozen weight.

Each takes the weight as an `(m, n)` matrix `w`, the rank `r` and the LoRA
scale `s`, and returns `(a, b, residual)`: the adapter factors and the new
frozen weight, with `residual + s * a @ b == w`, so the model's output is
unchanged at initialization. `residual is None` means `w` stays as it is.
"""

import math

from keras import ops

from keras_hrp import settings
from keras_hrp.linalg import truncated_svd


def _weight(w, rank, owner):
    w = ops.convert_to_tensor(w, dtype="float32")
    m, n = w.shape
    return w, settings.rank(owner, rank, min(m, n), f"a weight of shape {(m, n)}")


def _split_singular(u, s, vt, scale):
    """`a`, `b` with `scale * a @ b == u @ diag(s) @ vt`, balanced halves."""
    root = ops.sqrt(s / scale)
    return u * root, ops.expand_dims(root, 1) * vt


def pissa(w, rank, scale=1.0, svd="auto"):
    """PiSSA: the top-`rank` singular triplets of `w` go into the adapter.

    Modifies the base weight: it keeps the residual `w - U_r S_r V_r^T`.
    `svd` is `truncated_svd`'s method (randomized for large weights).
    """
    w, rank = _weight(w, rank, "pissa")
    u, s, v = truncated_svd(w, rank, method=svd)
    a, b = _split_singular(u, s, ops.transpose(v), scale)
    return a, b, w - scale * ops.matmul(a, b)


def milora(w, rank, scale=1.0):
    """MiLoRA: the bottom-`rank` singular triplets of `w` go into the adapter.

    Modifies the base weight: it keeps the residual.
    """
    w, rank = _weight(w, rank, "milora")
    u, s, vt = ops.svd(w, full_matrices=False)
    k = s.shape[0]
    a, b = _split_singular(u[:, k - rank :], s[k - rank :], vt[k - rank :], scale)
    return a, b, w - scale * ops.matmul(a, b)


def olora(w, rank, scale=1.0):
    """OLoRA: `w = QR`; the adapter starts at `Q_r`, `R_r / scale`.

    Modifies the base weight: it keeps `w - Q_r R_r`.
    """
    w, rank = _weight(w, rank, "olora")
    q, r = ops.qr(w, mode="reduced")
    a, b = q[:, :rank], r[:rank] / scale
    return a, b, w - scale * ops.matmul(a, b)


def gaussian(w, rank, scale=1.0, stddev=None, seed=None):
    """`A ~ N(0, 1/rank)` (or `stddev`), `B = 0`; the base weight is kept."""
    import keras

    w, rank = _weight(w, rank, "gaussian")
    stddev = 1.0 / math.sqrt(rank) if stddev is None else stddev
    a = keras.random.normal((w.shape[0], rank), stddev=stddev, seed=seed)
    return a, ops.zeros((rank, w.shape[1])), None


def lora_ga(w, grad, rank, scale=1.0, gamma=16.0, svd="auto"):
    """LoRA-GA: the adapter's first step follows the full-weight gradient.

    With `grad = U S V^T` (the loss gradient of the `(m, n)` weight),
    `A = U[:, :r] c` and `B = V[:, r:2r]^T c`, `c = n^(1/4) / sqrt(gamma)`:
    one step on `A` and `B` then moves the delta along the best rank-`2r`
    approximation of `grad`. Modifies the base weight: it keeps
    `w - scale * A @ B`.

    Args:
        w: the frozen weight, `(m, n)`.
        grad: its loss gradient, `(m, n)`, averaged over a few batches.
        rank: the LoRA rank `r`; needs `2r <= min(m, n)`.
        scale: the LoRA scale.
        gamma: LoRA-GA's stable-scale constant (larger: smaller factors).
        svd: `truncated_svd`'s method.
    """
    w, rank = _weight(w, rank, "lora_ga")
    grad = ops.convert_to_tensor(grad, dtype="float32")
    if tuple(grad.shape) != tuple(w.shape) or 2 * rank > min(w.shape):
        raise ValueError(
            f"lora_ga: needs `grad` shaped like the weight {tuple(w.shape)} and "
            f"2 * rank <= {min(w.shape)}. Received: grad.shape={tuple(grad.shape)}, "
            f"rank={rank}"
        )
    u, _, v = truncated_svd(grad, 2 * rank, method=svd)
    c = w.shape[1] ** 0.25 / math.sqrt(gamma)
    a, b = u[:, :rank] * c, ops.transpose(v[:, rank:]) * c
    return a, b, w - scale * ops.matmul(a, b)


def oracle(w, target, rank, norm):
    """`A` = the top-`rank` left singular directions of the true update.

    For synthetic tasks where the update `target` (shaped like `w`) the
    adapter should learn is known: what HRP approaches as its preheat rank
    and length grow. `A` is scaled to Frobenius norm `norm`, `B = 0`; the
    base weight is kept.
    """
    w, rank = _weight(w, rank, "oracle")
    target = ops.convert_to_tensor(target, dtype="float32")
    if tuple(target.shape) != tuple(w.shape):
        raise ValueError(
            f"oracle: `target` must have the weight's shape {tuple(w.shape)}. "
            f"Received: target.shape={tuple(target.shape)}"
        )
    u, _, _ = truncated_svd(target, rank, method="full")
    return u * (norm / math.sqrt(rank)), ops.zeros((rank, w.shape[1])), None


def eva(gram, rank):
    """EVA: the top-`rank` principal directions of a layer's inputs.

    `gram` is `X^T X` of the inputs `X` (tokens x the `k` features the weight
    contracts), summed over a few batches. Returns the `(k, rank)` matrix of
    its top eigenvectors (orthonormal columns, signs fixed: each column's
    largest-magnitude entry positive), which EVA puts into `A` with `B = 0`;
    the base weight is kept.
    """
    gram = ops.convert_to_tensor(gram, dtype="float32")
    k = gram.shape[0]
    if len(gram.shape) != 2 or gram.shape[1] != k:
        settings.fail("eva", "needs a square Gram matrix", **{"gram.shape": tuple(gram.shape)})
    rank = settings.rank("eva", rank, k, f"a Gram matrix of size {k}")
    _, vectors = ops.eigh((gram + ops.transpose(gram)) / 2)  # ascending eigenvalues
    top = ops.flip(vectors[:, k - rank :], axis=1)
    peak = ops.take_along_axis(top, ops.expand_dims(ops.argmax(ops.abs(top), axis=0), 0), axis=0)
    return top * ops.where(peak < 0, -1.0, 1.0)
