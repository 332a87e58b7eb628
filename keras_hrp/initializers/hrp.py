"""High-Rank Preheating: the new `A` from a preheated delta."""

import math

import keras
import numpy as np
from keras import ops

from keras_hrp.linalg import svd_of_product


def _fans(shape):
    if len(shape) < 2:
        size = math.prod(shape) or 1
        return size, size
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def expected_norm(initializer, shape):
    """Expected Frobenius norm of a tensor of `shape` drawn from `initializer`.

    Exact for variance-scaling initializers (`he_uniform`, `glorot_normal`,
    ...); other initializers are sampled once.

    Args:
        initializer: a Keras initializer or its name.
        shape: the tensor shape.

    Returns:
        A Python float.

    Example:

    >>> expected_norm("he_uniform", (64, 8))  # sqrt(2 * 8)
    4.0
    """
    init = keras.initializers.get(initializer)
    if isinstance(init, keras.initializers.VarianceScaling):
        fan_in, fan_out = _fans(tuple(shape))
        fan = {"fan_in": fan_in, "fan_out": fan_out}.get(
            init.mode, (fan_in + fan_out) / 2
        )
        return math.sqrt(math.prod(shape) * init.scale / max(1.0, fan))
    sample = init(tuple(shape), dtype="float32")
    return float(ops.convert_to_numpy(ops.norm(ops.reshape(sample, (-1,)))))


def _energy(s, rank):
    total = float(np.sum(np.square(s, dtype=np.float64)))
    return float(np.sum(np.square(s[:rank], dtype=np.float64))) / total if total > 0 else float("nan")


def directions_from_svd(u, s, rank, norm):
    """HRP's new `A` from the SVD `(u, s)` of a preheated delta (numpy).

    The top-`rank` left singular vectors, scaled to Frobenius norm `norm`:
    HRP keeps the directions, the magnitude stays that of an ordinary init.
    Only slicing and scaling, so a switch of many layers at different ranks
    compiles nothing per rank.

    Args:
        u: left singular vectors, `(m, k)`, columns by descending `s`.
        s: the `k` singular values, descending.
        rank: the new rank, at most `k`.
        norm: Frobenius norm of the returned matrix.

    Returns:
        `(new_a, energy)`: `new_a` of shape `(m, rank)` (float32) and the
        fraction of the delta's squared Frobenius norm in the kept directions.

    Example:

    >>> u = np.eye(6, 3, dtype="float32"); s = np.array([3.0, 2.0, 1.0])
    >>> new_a, energy = directions_from_svd(u, s, rank=2, norm=4.0)
    >>> new_a.shape, round(float(np.linalg.norm(new_a)), 4), round(energy, 4)
    ((6, 2), 4.0, 0.9286)
    """
    u = np.asarray(u, "float32")
    new_a = u[:, :rank] * np.float32(norm / math.sqrt(rank))
    return new_a, _energy(np.asarray(s), rank)


def truncated_from_svd(u, s, v, rank):
    """Balanced factors of the best rank-`rank` approximation, from an SVD (numpy).

    `A = U_r sqrt(S_r)`, `B = sqrt(S_r) V_r^T`: the main phase starts where
    the preheat left off (truncated to `rank`) instead of at `B = 0`.

    Returns:
        `(new_a, new_b, energy)`, float32, `energy` as in `directions_from_svd`.
    """
    u, s, v = (np.asarray(x, "float32") for x in (u, s, v))
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * v[:, :rank].T, _energy(s, rank)


def _numpy_svd(a, b):
    return tuple(ops.convert_to_numpy(x) for x in svd_of_product(a, b))


def preheated_a(a, b, rank, norm):
    """The HRP initialization of `A` from a preheated adapter `a @ b`.

    The SVD of the preheated delta `a @ b` (`svd_of_product`, never forming
    the product), then `directions_from_svd`. `B` restarts at zero.

    Args:
        a: preheated `A` as a `(m, R)` matrix (scale folded in or not: only
            directions are used).
        b: preheated `B` of shape `(R, n)`.
        rank: the new rank `r <= R`.
        norm: Frobenius norm of the returned matrix.

    Returns:
        `(new_a, singular_values, energy)` as numpy: `new_a` of shape
        `(m, rank)`, all `min(m, n, R)` singular values of `a @ b`
        (descending), and the fraction of the delta's squared Frobenius norm
        in the kept directions.
    """
    u, s, _ = _numpy_svd(a, b)
    new_a, energy = directions_from_svd(u, s, rank, norm)
    return new_a, s, energy


def preheated_factors(a, b, rank):
    """`(A, B)` whose product is the best rank-`rank` approximation of `a @ b`.

    The alternative to `preheated_a` that keeps the preheated singular
    values (`truncated_from_svd`).

    Returns:
        `(new_a, new_b, singular_values, energy)` as numpy, the last two as
        in `preheated_a`.
    """
    u, s, v = _numpy_svd(a, b)
    new_a, new_b, energy = truncated_from_svd(u, s, v, rank)
    return new_a, new_b, s, energy
