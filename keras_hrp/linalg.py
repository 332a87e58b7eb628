"""Pure linear-algebra helpers, written in `keras.ops` for every backend."""

import numpy as np
from keras import ops

from keras_hrp import settings


def _as_matrix(x, name):
    x = ops.convert_to_tensor(x, dtype="float32")
    if len(x.shape) != 2:
        raise ValueError(
            f"`{name}` must be a 2D matrix. "
            f"Received: {name}.shape={tuple(x.shape)}"
        )
    return x




def fixed_signs(u, v):
    """Flips singular pairs so each `u` column's largest-magnitude entry is positive.

    An SVD fixes each pair `(u_i, v_i)` only up to a common sign, which
    LAPACK builds, devices and backends choose differently. Fixing it makes
    the result a function of the matrix alone: replicas that decompose the
    same adapter agree bit for bit.
    """
    peak = ops.argmax(ops.abs(u), axis=0)
    signs = ops.sign(ops.take_along_axis(u, ops.expand_dims(peak, 0), axis=0))
    signs = ops.where(signs == 0, ops.ones_like(signs), signs)
    return u * signs, v * signs


def svd_of_product(a, b, rank=None):
    """Truncated SVD of `a @ b`, computed from the factors.

    The product is never formed: `a = Qa Ra` and `b.T = Qb Rb` (reduced QR),
    so `a @ b = Qa (Ra Rb^T) Qb^T` and only the small core `Ra Rb^T` is
    decomposed. For `a` of shape `(m, k)` and `b` of shape `(k, n)` this costs
    O((m + n) k^2) instead of O(m n min(m, n)). Everything runs in float32.
    Signs are fixed (`fixed_signs`), so the result is deterministic.

    Args:
        a: matrix of shape `(m, k)`.
        b: matrix of shape `(k, n)`.
        rank: number of singular triplets to return, at most
            `min(m, n, k)`. `None` returns all of them.

    Returns:
        `(u, s, v)` with `u` of shape `(m, rank)`, `s` of shape `(rank,)` in
        descending order and `v` of shape `(n, rank)`, such that
        `u @ diag(s) @ v.T` is the best rank-`rank` approximation of `a @ b`.

    Example:

    >>> a = np.random.randn(512, 16); b = np.random.randn(16, 256)
    >>> u, s, v = svd_of_product(a, b, rank=4)
    >>> tuple(u.shape), tuple(s.shape), tuple(v.shape)
    ((512, 4), (4,), (256, 4))
    """
    a = _as_matrix(a, "a")
    b = _as_matrix(b, "b")
    (m, k), (k_b, n) = a.shape, b.shape
    if k != k_b:
        raise ValueError(
            "svd_of_product: inner dimensions differ. "
            f"Received: a.shape={(m, k)}, b.shape={(k_b, n)}"
        )
    max_rank = min(m, n, k)
    if rank is None:
        rank = max_rank
    rank = settings.rank("svd_of_product", rank, max_rank, f"a.shape={(m, k)}, b.shape={(k, n)}")
    q_a, r_a = ops.qr(a, mode="reduced")
    q_b, r_b = ops.qr(ops.transpose(b), mode="reduced")
    core = ops.matmul(r_a, ops.transpose(r_b))
    u_core, s, vt_core = ops.svd(core, full_matrices=False)
    u = ops.matmul(q_a, u_core[:, :rank])
    v = ops.matmul(q_b, ops.transpose(vt_core[:rank, :]))
    u, v = fixed_signs(u, v)
    return u, s[:rank], v


def randomized_svd(w, rank, oversample=8, power_iterations=2, seed=None):
    """Approximate top-`rank` SVD of `w` by randomized range finding.

    Projects `w` on `rank + oversample` random directions, sharpens the
    range with `power_iterations` rounds of `w w^T` (re-orthonormalized each
    time), and decomposes the small projected matrix. Costs
    O(m n (rank + oversample)) per round instead of O(m n min(m, n)); close
    to exact when the spectrum decays past `rank`.

    Args:
        w: matrix of shape `(m, n)`.
        rank: number of singular triplets, at most `min(m, n)`.
        oversample: extra random directions (accuracy for speed).
        power_iterations: rounds of power iteration.
        seed: seed of the random projection.

    Returns:
        `(u, s, v)` shaped as `svd_of_product` returns them.

    Example:

    >>> u, s, v = randomized_svd(np.random.randn(2048, 1024), rank=8)
    >>> tuple(u.shape), tuple(s.shape), tuple(v.shape)
    ((2048, 8), (8,), (1024, 8))
    """
    import keras

    w = _as_matrix(w, "w")
    m, n = w.shape
    rank = settings.rank("randomized_svd", rank, min(m, n), f"w.shape={(m, n)}")
    width = min(rank + oversample, m, n)
    q, _ = ops.qr(ops.matmul(w, keras.random.normal((n, width), seed=seed)))
    for _ in range(power_iterations):
        p, _ = ops.qr(ops.matmul(ops.transpose(w), q))
        q, _ = ops.qr(ops.matmul(w, p))
    u_core, s, vt = ops.svd(ops.matmul(ops.transpose(q), w), full_matrices=False)
    u, v = fixed_signs(ops.matmul(q, u_core[:, :rank]), ops.transpose(vt[:rank]))
    return u, s[:rank], v


RANDOMIZED_MIN_DIM = 1024


def truncated_svd(w, rank, method="auto", seed=None):
    """Top-`rank` SVD of `w`: dense for small matrices, randomized for large.

    Args:
        w: matrix of shape `(m, n)`.
        rank: number of singular triplets.
        method: `"full"` (dense SVD), `"randomized"` (`randomized_svd`) or
            `"auto"`: randomized when `min(m, n) >= 1024` and
            `4 * (rank + 8) <= min(m, n)`, where it is many times faster.
        seed: seed of the randomized projection.

    Returns:
        `(u, s, v)` shaped as `svd_of_product` returns them.

    Example:

    >>> u, s, v = truncated_svd(np.diag([3.0, 2.0, 1.0]), rank=2)
    >>> np.round(np.asarray(s), 4).tolist()
    [3.0, 2.0]
    """
    w = _as_matrix(w, "w")
    m, n = w.shape
    if method not in ("auto", "full", "randomized"):
        raise ValueError(
            "truncated_svd: `method` must be 'auto', 'full' or 'randomized'. "
            f"Received: method={method!r}"
        )
    rank = settings.rank("truncated_svd", rank, min(m, n), f"w.shape={(m, n)}")
    small = min(m, n)
    if method == "auto":
        large = small >= RANDOMIZED_MIN_DIM and 4 * (rank + 8) <= small
        method = "randomized" if large else "full"
    if method == "randomized":
        return randomized_svd(w, rank, seed=seed)
    u, s, vt = ops.svd(w, full_matrices=False)
    u, v = fixed_signs(u[:, :rank], ops.transpose(vt[:rank]))
    return u, s[:rank], v


def largest_principal_angle(u, w):
    """The largest principal angle, in degrees, between the column spans of
    `u` and `w` (both `(m, r)` with orthonormal columns): 0 when the spans
    are equal, 90 when a direction of one is orthogonal to the other.

    Example:

    >>> largest_principal_angle(np.eye(3)[:, :1], np.eye(3)[:, 1:2])
    90.0
    """
    u, w = _as_matrix(u, "u"), _as_matrix(w, "w")
    if u.shape != w.shape:
        raise ValueError(
            f"largest_principal_angle: the bases differ in shape. Received: u.shape={tuple(u.shape)}, "
            f"w.shape={tuple(w.shape)}"
        )
    cosines = ops.svd(ops.matmul(ops.transpose(u), w), compute_uv=False)
    smallest = float(np.clip(np.min(ops.convert_to_numpy(cosines)), 0.0, 1.0))
    return float(np.degrees(np.arccos(smallest)))
