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


def factor_matrices(layer, stop_gradient=True):
    """`(A, B)` as float32 matrices of shapes `(m, rank)` and `(rank, n)`."""
    a, b = (ops.convert_to_tensor(v) for v in lora_factors(layer))
    if stop_gradient:
        a, b = ops.stop_gradient(a), ops.stop_gradient(b)
    return ops.reshape(a, (-1, b.shape[0])), b


def kernel_shape(layer):
    """Shape of the layer's frozen weight (the Embedding's table, the kernel)."""
    if isinstance(layer, keras.layers.Embedding):
        return (layer.input_dim, layer.output_dim)
    if layer.quantization_mode is None:
        return tuple(internals.base_weight(layer).shape)
    if getattr(layer, "lora_enabled", False):  # packed; no merged kernel just for a shape
        a, b = lora_factors(layer)
        return tuple(a.shape[:-1]) + (b.shape[1],)
    return tuple(layer.kernel.shape)


def factorization_of(layer):
    """`"per_head"` or `"full"`: how the layer's adapter factors its weight."""
    state = getattr(layer, "hrp_state", None)
    return "per_head" if state is None else state.factorization


def factor_axes(layer, factorization=None):
    """`(A's kernel axes, B's kernel axes)`, as positions in the frozen weight.

    `"per_head"` (Keras' layout, and the only one of `Dense` / `Embedding`):
    `A` keeps every axis but the last, `B` the last. `"full"` (standard
    LoRA, an `EinsumDense` only): `A` the axes the input contracts, `B` every
    output axis, so `A @ B` has rank `r` over the whole weight; for a query
    projection `(hidden, heads, head_dim)` that is `A (hidden, r)` and
    `B (r, heads * head_dim)` instead of `A (hidden, heads, r)`,
    `B (r, head_dim)`. `factorization=None`: the layer's own.
    """
    ndim = len(kernel_shape(layer))
    factorization = factorization_of(layer) if factorization is None else factorization
    if factorization == "full" and isinstance(layer, keras.layers.EinsumDense):
        inputs, kernel = layer.equation.split("->")[0].split(",")
        return (tuple(i for i, c in enumerate(kernel) if c in inputs),
                tuple(i for i, c in enumerate(kernel) if c not in inputs))
    return tuple(range(ndim - 1)), (ndim - 1,)


def a_shape_at_rank(layer, rank, factorization=None):
    """Shape `A` takes on this layer at `rank` (LoRA enabled or not)."""
    shape = kernel_shape(layer)
    return tuple(shape[i] for i in factor_axes(layer, factorization)[0]) + (rank,)


def b_shape_at_rank(layer, rank, factorization=None):
    return (rank, weight_matrix_shape(layer, factorization)[1])


def weight_matrix_shape(layer, factorization=None):
    """`(m, n)`: the layer's frozen weight as the matrix its LoRA adapts."""
    shape = kernel_shape(layer)
    a_axes, b_axes = factor_axes(layer, factorization)
    return math.prod(shape[i] for i in a_axes), math.prod(shape[i] for i in b_axes)


def load_problem(layer, a_shape, b_shape, rank, factorization):
    """Why saved factors of these shapes (rank `rank`, factored as
    `factorization`) cannot load into `layer`, or `None`."""
    if getattr(layer, "lora_enabled", False) and factorization_of(layer) != factorization:
        return f"saved with factorization '{factorization}', the layer uses '{factorization_of(layer)}'"
    want_a, want_b = a_shape_at_rank(layer, rank, factorization), b_shape_at_rank(layer, rank, factorization)
    if tuple(a_shape) != want_a or tuple(b_shape) != want_b:
        return f"saved A{tuple(a_shape)} B{tuple(b_shape)}, layer needs A{want_a} B{want_b}"
    return None


def max_useful_rank(layer, factorization=None):
    """Largest rank at which the delta `A @ B` can still gain rank."""
    return min(weight_matrix_shape(layer, factorization))


def _array_module(x):
    return np if isinstance(x, np.ndarray) else ops  # numpy stays numpy (float64)


def to_matrix(layer, kernel):
    """The layer's weight (or a tensor shaped like it) as its `(m, n)` matrix."""
    xp = _array_module(kernel)
    a_axes, b_axes = factor_axes(layer)
    return xp.reshape(xp.transpose(kernel, a_axes + b_axes), weight_matrix_shape(layer))


def to_kernel(layer, matrix):
    """The inverse of `to_matrix`: an `(m, n)` matrix in the weight's layout."""
    xp = _array_module(matrix)
    shape, order = kernel_shape(layer), sum(factor_axes(layer), ())
    grouped = xp.reshape(matrix, tuple(shape[i] for i in order))
    return xp.transpose(grouped, tuple(int(i) for i in np.argsort(order)))


def merged_kernel(layer):
    """`W + scale * A @ B` in the weight's layout and the compute dtype."""
    a, b = factor_matrices(layer, stop_gradient=False)
    delta = ops.multiply(ops.matmul(a, b), lora_scale(layer))
    base = ops.cast(internals.base_weight(layer), "float32")
    return ops.cast(ops.add(base, to_kernel(layer, delta)), layer.compute_dtype)


def enable_adapter(layer, rank, scale, trainable_a=True):
    """Enables Keras LoRA at `rank` with delta `scale * A @ B`, factored as
    `factorization_of(layer)` says (set `layer.hrp_state` first).

    `A` starts he_uniform and `B` zero (Keras' init); `trainable_a=False`
    freezes `A` (asymmetric LoRA).
    """
    layer.enable_lora(rank, lora_alpha=scale * rank, a_initializer=DEFAULT_A_INITIALIZER)
    if tuple(lora_factors(layer)[0].shape) != a_shape_at_rank(layer, rank):
        resize(layer, rank)  # Keras made per-head factors
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
    if factor_axes(layer) != factor_axes(layer, "per_head"):
        if layer.quantization_mode is not None:
            raise ValueError(
                f"Layer '{layer.path}': factorization 'full' needs a float kernel (Keras' "
                "quantized LoRA computes per head). Received: "
                f"quantization_mode={layer.quantization_mode!r}"
            )
        internals.use_kernel_property(layer, merged_kernel)  # Keras' merge fits per-head shapes


def resize(layer, rank):
    """Re-creates the layer's adapter at `rank` (`A` he_uniform, `B = 0`).

    The output is unchanged (`B = 0`); callers that load values overwrite
    both factors.
    """
    old_a = lora_factors(layer)[0]
    initializer = keras.initializers.get(DEFAULT_A_INITIALIZER)
    a = initializer(a_shape_at_rank(layer, rank), dtype="float32")
    b = ops.zeros(b_shape_at_rank(layer, rank), dtype="float32")
    replace_factors(layer, a, b, trainable_a=old_a.trainable)


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
