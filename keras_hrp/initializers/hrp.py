"""High-Rank Preheating: the new `A` from a preheated delta."""

import math

import keras
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


def preheated_a(a, b, rank, norm):
    """The HRP initialization of `A` from a preheated adapter `a @ b`.

    Takes the top-`rank` left singular vectors of the preheated delta
    `a @ b` (found with `svd_of_product`, never forming the product) and
    scales them to Frobenius norm `norm`: HRP keeps the directions, the
    magnitude stays that of an ordinary init. `B` restarts at zero.

    Args:
        a: preheated `A` as a `(m, R)` matrix (scale folded in or not: only
            directions are used).
        b: preheated `B` of shape `(R, n)`.
        rank: the new rank `r <= R`.
        norm: Frobenius norm of the returned matrix.

    Returns:
        `(new_a, singular_values, energy)`: `new_a` of shape `(m, rank)`, all
        `min(m, n, R)` singular values of `a @ b` (descending), and the
        fraction of the delta's squared Frobenius norm in the kept directions.
    """
    u, s, _ = svd_of_product(a, b)
    new_a = u[:, :rank] * (norm / math.sqrt(rank))
    energy = ops.sum(ops.square(s[:rank])) / ops.sum(ops.square(s))
    return new_a, s, energy


def preheated_factors(a, b, rank):
    """`(A, B)` whose product is the best rank-`rank` approximation of `a @ b`.

    The alternative to `preheated_a` that keeps the preheated singular
    values: the main phase starts where the preheat left off (truncated to
    `rank`) instead of at `B = 0`. The factors are balanced:
    `A = U_r sqrt(S_r)`, `B = sqrt(S_r) V_r^T`.

    Returns:
        `(new_a, new_b, singular_values, energy)`, the last two as in
        `preheated_a`.
    """
    u, s, v = svd_of_product(a, b)
    root = ops.sqrt(s[:rank])
    new_a = u[:, :rank] * root
    new_b = ops.expand_dims(root, 1) * ops.transpose(v[:, :rank])
    energy = ops.sum(ops.square(s[:rank])) / ops.sum(ops.square(s))
    return new_a, new_b, s, energy
