"""Reading, writing and resizing the LoRA factors Keras keeps on a layer.

Keras stores the adapter of `Dense`, `EinsumDense` and `Embedding` as two
float32 variables, `A` on the input side and `B` on the output side, and adds
`(lora_alpha / lora_rank) * A @ B` to the frozen weight. `A` may have several
leading axes (`EinsumDense`); as a matrix it is `reshape(A, (-1, rank))`.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_hrp import internals

DEFAULT_A_INITIALIZER = "he_uniform"


def _factor_names(layer):
    if hasattr(layer, "lora_embeddings_a"):
        return "lora_embeddings_a", "lora_embeddings_b"
    return "lora_kernel_a", "lora_kernel_b"


def lora_factors(layer):
    """Returns the layer's LoRA variables `(A, B)`."""
    if not getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"Layer '{layer.name}' has no LoRA adapter. "
            f"Received: lora_enabled={getattr(layer, 'lora_enabled', None)}"
        )
    a_name, b_name = _factor_names(layer)
    return getattr(layer, a_name), getattr(layer, b_name)


def lora_scale(layer):
    """The factor Keras multiplies `A @ B` by: `lora_alpha / lora_rank`."""
    return layer.lora_alpha / layer.lora_rank


def factor_matrices(layer):
    """`(A, B)` as float32 matrices of shapes `(m, rank)` and `(rank, n)`."""
    a, b = lora_factors(layer)
    rank = b.shape[0]
    a = ops.reshape(ops.stop_gradient(ops.convert_to_tensor(a)), (-1, rank))
    return a, ops.stop_gradient(ops.convert_to_tensor(b))


def _weight_shape(layer):
    if isinstance(layer, keras.layers.Embedding):
        return (layer.input_dim, layer.output_dim)
    if getattr(layer, "lora_enabled", False):  # no merged kernel just for a shape
        a, b = lora_factors(layer)
        return tuple(a.shape[:-1]) + (b.shape[1],)
    return tuple(layer.kernel.shape)


def a_shape_at_rank(layer, rank):
    """Shape `A` takes on this layer at `rank` (LoRA enabled or not)."""
    return _weight_shape(layer)[:-1] + (rank,)


def weight_matrix_shape(layer):
    """`(m, n)`: the layer's frozen weight as the matrix its LoRA adapts."""
    shape = _weight_shape(layer)
    return math.prod(shape[:-1]), shape[-1]


def max_useful_rank(layer):
    """Largest rank at which the delta `A @ B` can still gain rank."""
    return min(weight_matrix_shape(layer))


def enable_adapter(layer, rank, scale, trainable_a=True):
    """Enables Keras LoRA at `rank` with delta `scale * A @ B`.

    `A` starts he_uniform and `B` zero (Keras' init); `trainable_a=False`
    freezes `A` (asymmetric LoRA).
    """
    layer.enable_lora(rank, lora_alpha=scale * rank, a_initializer=DEFAULT_A_INITIALIZER)
    if not trainable_a:
        lora_factors(layer)[0].trainable = False


def replace_factors(layer, a, b, trainable_a=True):
    """Replaces the layer's LoRA variables by new ones holding `a` and `b`.

    This is a true resize: the old variables are untracked and deleted, the
    new ones have the rank of `b` (its first axis) and keep the old names,
    paths, regularizers and constraints. `lora_scale(layer)` is unchanged.

    Args:
        layer: a built layer with LoRA enabled.
        a: new `A`, as a `(m, rank)` matrix or in the layer's `A` shape.
        b: new `B` of shape `(rank, n)`.
        trainable_a: whether the new `A` trains.
    """
    old_a, old_b = lora_factors(layer)
    a_name, b_name = _factor_names(layer)
    rank = b.shape[0]
    scale = lora_scale(layer)
    a = ops.reshape(a, a_shape_at_rank(layer, rank))
    internals.replace_variable(layer, a_name, a, trainable_a, like=old_a)
    internals.replace_variable(layer, b_name, b, old_b.trainable, like=old_b)
    layer.lora_rank = rank
    layer.lora_alpha = scale * rank


def resize(layer, rank):
    """Re-creates the layer's adapter at `rank` (`A` he_uniform, `B = 0`).

    The output is unchanged (`B = 0`); callers that load values overwrite
    both factors.
    """
    old_a, old_b = lora_factors(layer)
    initializer = keras.initializers.get(DEFAULT_A_INITIALIZER)
    a = initializer(a_shape_at_rank(layer, rank), dtype="float32")
    b = ops.zeros((rank, old_b.shape[1]), dtype="float32")
    replace_factors(layer, a, b, trainable_a=old_a.trainable)


def b_shape_at_rank(layer, rank):
    return (rank, weight_matrix_shape(layer)[1])


def frozen_variables(layer):
    """The frozen weights under the adapter: the base kernel, quantization scales."""
    factors = [id(v) for v in lora_factors(layer)]
    return [
        v for v in internals.own_variables(layer) if not v.trainable and id(v) not in factors
    ]


def revive(layer):
    """Re-draws `A` if both factors are zero (as Keras' loading leaves them).

    With `A = B = 0` both gradients are zero forever; with `B = 0` a fresh
    he_uniform `A` changes no output and lets the adapter train again.
    Returns whether it re-drew.
    """
    a, b = lora_factors(layer)
    if np.any(ops.convert_to_numpy(a)) or np.any(ops.convert_to_numpy(b)):
        return False
    initializer = keras.initializers.get(DEFAULT_A_INITIALIZER)  # new seed
    a.assign(initializer(tuple(a.shape), dtype="float32"))
    return True
