"""LoRA passes that never form the gradient of the merged weight.

Keras' float LoRA multiplies the input by the merged kernel
`K = W + s A @ B`, so autodiff forms `dK = x^T dy`, the size of `W`, every
step and only then projects it onto `A` and `B`: the weight-gradient work of
full fine-tuning. Here the gradients come from the factors,
`dA = s x^T (dy B^T)` and `dB = s (x A)^T dy`, and the frozen `W` gets none.
The forward pass takes whichever of two exact forms costs less for the
layer's shapes, chosen when the call is traced:

- unmerged, `x @ W + s (x @ A) @ B`: nothing the size of `W` is formed;
  best when a batch holds few tokens for the weight's size;
- merged, `x @ K` with `K` formed for the pass (and again for the input's
  gradient, under a custom gradient): best when the tokens outnumber
  `2 m n / (m + n)` for an `m x n` weight, where the unmerged form's extra
  passes over the activations cost more than forming `K`.

Outputs and gradients equal Keras' merged LoRA to float rounding. Quantized
layers keep Keras' quantized call (already unmerged).
"""

import functools
import math
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


@functools.cache  # read on every call of a layer (eagerly on torch)
def gradient_equations(equation):
    """The einsums of the merged form's factored gradient, or `None`.

    Keys: `merge` (`A, B -> K`), `dx` (`dy, K -> dx`), `g` (`dy, B -> dy B^T`),
    `da` (`x, g -> dA`), `low` (`x, A -> x A`), `db` (`x A, dy -> dB`). `None`
    where an einsum cannot express one (ellipses, an input axis summed
    away, no adapter equations).

    Example:

    >>> gradient_equations("ab,bc->ac")["da"]
    'ab,ad->bd'
    """
    lows = lora_equations(equation)
    if lows is None or "." in equation:
        return None
    inputs, rest = equation.split(",")
    kernel, output = rest.split("->")
    if any(c not in output + kernel for c in inputs) or any(c not in inputs + output for c in kernel):
        return None
    low_eq, up_eq = lows
    low = low_eq.split("->")[1]
    r, e = up_eq.split(",")[1][:2]
    return {"merge": f"{kernel[:-1]}{r},{r}{e}->{kernel}", "dx": f"{output},{kernel}->{inputs}",
            "g": f"{output},{r}{e}->{low}", "da": f"{inputs},{low}->{kernel[:-1]}{r}",
            "low": low_eq, "db": f"{low},{output}->{r}{e}"}


def prefers_merged(layer, input_shape, kernel_shape, contracted):
    """Whether the merged form is the cheaper one (see the module docstring).

    The weight is a `rows x columns` matrix, `rows` its axes the input
    contracts (`contracted`: one flag per kernel axis); the input holds
    `size / rows` tokens. Unknown dimensions (a symbolic batch) choose the
    unmerged form, which forms nothing the size of the weight; so does a
    base weight that trains (the merged form gives it no gradient).
    """
    if internals.base_weight(layer).trainable or any(d is None for d in input_shape):
        return False
    rows = math.prod(d for d, flag in zip(kernel_shape, contracted) if flag)
    columns = math.prod(kernel_shape) // rows
    return math.prod(input_shape) // rows >= 2 * rows * columns / (rows + columns)


def merged_with_factored_gradient(equations, scale):
    """`f(x, w, a, b) = einsum(x, w + scale * a b)` whose gradient never forms
    `dK`: `w` gets none, `a` and `b` theirs from the factors."""

    @ops.custom_gradient
    def forward(x, w, a, b):
        def merged():
            return ops.add(w, ops.multiply(ops.einsum(equations["merge"], a, b), scale))

        def grad(*args, upstream=None):
            dy = args[0] if upstream is None else upstream  # torch passes `upstream`
            dx = ops.einsum(equations["dx"], dy, merged())
            g = ops.einsum(equations["g"], dy, b)
            da = ops.multiply(ops.einsum(equations["da"], x, g), scale)
            low = ops.einsum(equations["low"], x, a)
            db = ops.multiply(ops.einsum(equations["db"], low, dy), scale)
            return dx, None, da, db

        return ops.einsum(equations["forward"], x, merged()), grad

    return forward


def _operands(layer, dtype):
    """The frozen weight and `(A, B)` as tensors in the compute dtype (the
    factors are float32 variables; some backends' einsum and matmul refuse
    mixed dtypes, and none should promote the layer)."""
    return tuple(ops.cast(v, dtype) for v in (internals.base_weight(layer), *lora.lora_factors(layer)))


def _scale(layer):
    return layer.lora_alpha / layer.lora_rank


def _finish(layer, x):
    if layer.bias is not None:
        x = ops.add(x, layer.bias)
    if layer.activation is not None:
        x = layer.activation(x)
    return x


DENSE = "ab,bc->ac"
DENSE_GRADIENTS = {**gradient_equations(DENSE), "forward": DENSE}


def dense_call(layer, inputs):
    """`Dense.call`, the adapter's gradients from its factors."""
    w, a, b = _operands(layer, inputs.dtype)
    rows, columns = w.shape
    if prefers_merged(layer, tuple(inputs.shape), w.shape, (True, False)):
        flat = ops.reshape(inputs, (-1, rows))
        y = merged_with_factored_gradient(DENSE_GRADIENTS, _scale(layer))(flat, w, a, b)
        return _finish(layer, ops.reshape(y, tuple(inputs.shape[:-1]) + (columns,)))
    delta = ops.multiply(ops.matmul(ops.matmul(inputs, a), b), _scale(layer))
    return _finish(layer, ops.add(ops.matmul(inputs, w), delta))


def einsum_dense_call(layer, inputs, equations):
    """`EinsumDense.call`, the adapter's gradients from its factors
    (`equations` from `lora_equations`)."""
    w, a, b = _operands(layer, inputs.dtype)
    gradients = gradient_equations(layer.equation)
    input_axes, kernel_axes = layer.equation.split("->")[0].split(",")
    contracted = [c in input_axes for c in kernel_axes]
    if gradients is not None and prefers_merged(layer, tuple(inputs.shape), w.shape, contracted):
        op = merged_with_factored_gradient({**gradients, "forward": layer.equation}, _scale(layer))
        return _finish(layer, op(inputs, w, a, b))
    low = ops.einsum(equations[0], inputs, a)
    delta = ops.multiply(ops.einsum(equations[1], low, b), _scale(layer))
    return _finish(layer, ops.add(ops.einsum(layer.equation, inputs, w), delta))


def embedding_call(layer, inputs):
    """`Embedding.call` with the adapter unmerged: rows of `W` plus rows of `A` times `B`."""
    if inputs.dtype not in ("int32", "int64"):
        inputs = ops.cast(inputs, "int32")
    rows = ops.take(internals.base_weight(layer), inputs, axis=0)
    a, b = (ops.cast(v, rows.dtype) for v in lora.lora_factors(layer))
    delta = ops.multiply(ops.matmul(ops.take(a, inputs, axis=0), b), _scale(layer))
    return ops.cast(ops.add(rows, delta), layer.compute_dtype)


def _call_for(layer):
    """The fast call for `layer`, or `None` where Keras' own stays."""
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


def use_fast_lora(layer):
    """Makes `layer` compute its LoRA adapter with this module's passes (float modes).

    Returns whether it does: Keras' own call stays for layers this module
    has no path for (ReversibleEmbedding, an EinsumDense whose kernel's
    last axis is not an output axis).
    """
    fast = _call_for(layer)
    if fast is None:
        return False

    def wrapper(original):
        def call(inputs, *args, **kwargs):
            if not layer.lora_enabled or layer.quantization_mode is not None:
                return original(inputs, *args, **kwargs)
            return fast(inputs)

        return call

    internals.wrap_method(layer, "call", wrapper)
    return True
