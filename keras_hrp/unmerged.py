"""Unmerged LoRA forward passes for the layers keras-hrp adapts.

Keras' float LoRA path multiplies the input by the merged kernel
`W + s A @ B`, so autodiff forms the gradient of the whole merged weight
every step and the forward pass an `in x out` temporary per layer. The
unmerged path computes `x @ W + s (x @ A) @ B`: the frozen `W` gets no
gradient and nothing of its size is formed. Outputs equal the merged ones
to float rounding. Quantized layers keep Keras' quantized call (already
unmerged).
"""

import string

import keras
from keras import ops

from keras_hrp import internals
from keras_hrp import lora


def lora_equations(equation):
    """The two einsums of an unmerged EinsumDense adapter, or `None`.

    For `inputs, kernel -> output` with the adapter on the kernel's last
    axis `e` (`A`: the kernel's other axes and `r`; `B`: `(r, e)`), returns
    `("inputs,kernel[:-1]r->output[e:=r]", "output[e:=r],re->output")`.
    `None` when `e` is not an output axis only (no such adapter).

    Example:

    >>> lora_equations("abc,cde->abde")
    ('abc,cdf->abdf', 'abdf,fe->abde')
    """
    inputs, rest = equation.split(",")
    kernel, output = rest.split("->")
    last = kernel[-1]
    if last in inputs or output.count(last) != 1:
        return None
    free = next(c for c in string.ascii_lowercase if c not in equation)
    low = output.replace(last, free)
    return f"{inputs},{kernel[:-1]}{free}->{low}", f"{low},{free}{last}->{output}"


def _factors(layer, dtype):
    """`(A, B)` in the compute dtype (they are float32 variables; some backends'
    einsum and matmul refuse mixed dtypes, and none should promote the layer)."""
    return tuple(ops.cast(v, dtype) for v in lora.lora_factors(layer))


def _scale(layer):
    return layer.lora_alpha / layer.lora_rank


def _finish(layer, x):
    if layer.bias is not None:
        x = ops.add(x, layer.bias)
    if layer.activation is not None:
        x = layer.activation(x)
    return x


def dense_call(layer, inputs):
    """`Dense.call` with the adapter unmerged."""
    a, b = _factors(layer, inputs.dtype)
    delta = ops.multiply(ops.matmul(ops.matmul(inputs, a), b), _scale(layer))
    return _finish(layer, ops.add(ops.matmul(inputs, internals.base_weight(layer)), delta))


def einsum_dense_call(layer, inputs, equations):
    """`EinsumDense.call` with the adapter unmerged (`equations` from `lora_equations`)."""
    a, b = _factors(layer, inputs.dtype)
    low = ops.einsum(equations[0], inputs, a)
    delta = ops.multiply(ops.einsum(equations[1], low, b), _scale(layer))
    return _finish(layer, ops.add(ops.einsum(layer.equation, inputs, internals.base_weight(layer)), delta))


def embedding_call(layer, inputs):
    """`Embedding.call` with the adapter unmerged: rows of `W` plus rows of `A` times `B`."""
    if inputs.dtype not in ("int32", "int64"):
        inputs = ops.cast(inputs, "int32")
    rows = ops.take(internals.base_weight(layer), inputs, axis=0)
    a, b = _factors(layer, rows.dtype)
    delta = ops.multiply(ops.matmul(ops.take(a, inputs, axis=0), b), _scale(layer))
    return ops.cast(ops.add(rows, delta), layer.compute_dtype)


def _call_for(layer):
    """The unmerged call for `layer`, or `None` where Keras' own stays."""
    if type(layer) is keras.layers.Embedding:  # subclasses (ReversibleEmbedding) differ
        return lambda inputs: embedding_call(layer, inputs)
    if isinstance(layer, keras.layers.EinsumDense):
        equations = lora_equations(layer.equation)
        if equations is None:
            return None
        return lambda inputs: einsum_dense_call(layer, inputs, equations)
    if isinstance(layer, keras.layers.Dense):
        return lambda inputs: dense_call(layer, inputs)
    return None


def use_unmerged(layer):
    """Makes `layer` compute its LoRA adapter unmerged (float modes).

    Returns whether it does: Keras' own call stays for layers this module
    has no unmerged path for (ReversibleEmbedding, an EinsumDense whose
    kernel's last axis is not an output axis).
    """
    unmerged = _call_for(layer)
    if unmerged is None:
        return False

    def wrapper(original):
        def call(inputs, *args, **kwargs):
            if not layer.lora_enabled or layer.quantization_mode is not None:
                return original(inputs, *args, **kwargs)
            return unmerged(inputs)

        return call

    internals.wrap_method(layer, "call", wrapper)
    return True
