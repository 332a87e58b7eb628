"""Reading, writing and resizing the LoRA factors Keras keeps on a layer.

Keras stores the adapter of `Dense`, `EinsumDense` and `Embedding` as two
float32 variables, `A` on the input side and `B` on the output side, and adds
`(lora_alpha / lora_rank) * A @ B` to the frozen weight. `A` may have several
leading axes (`EinsumDense`); as a matrix it is `reshape(A, (-1, rank))`.
"""

import math

import keras
from keras import ops

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


def a_shape_at_rank(layer, rank):
    """Shape `A` takes on this layer at `rank`."""
    a, _ = lora_factors(layer)
    return tuple(a.shape[:-1]) + (rank,)


def weight_matrix_shape(layer):
    """`(m, n)`: the layer's frozen weight as the matrix its LoRA adapts."""
    if isinstance(layer, keras.layers.Embedding):
        shape = (layer.input_dim, layer.output_dim)
    else:
        shape = tuple(layer.kernel.shape)
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
    layer._tracker.unlock()
    try:
        for old, name, value, trainable in (
            (old_a, a_name, a, trainable_a),
            (old_b, b_name, b, old_b.trainable),
        ):
            # Untrack and delete without Layer.__delattr__, which runs a full
            # gc.collect() per variable: one per switch is enough.
            layer._untrack_variable(old)
            super(keras.layers.Layer, layer).__delattr__(name)
            new = layer.add_weight(
                name=name,
                shape=tuple(value.shape),
                initializer="zeros",
                dtype="float32",
                trainable=trainable,
                regularizer=old.regularizer,
                constraint=old.constraint,
            )
            new.assign(value)
            setattr(layer, name, new)
    finally:
        layer._tracker.lock()
    layer.lora_rank = rank
    layer.lora_alpha = scale * rank
