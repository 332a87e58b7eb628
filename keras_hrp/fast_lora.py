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
  gradient): best when the tokens outnumber `2 m n / (m + n)` for an
  `m x n` weight, where the unmerged form's extra passes over the
  activations cost more than forming `K`.

Both run under one custom gradient, which also fixes how the factors'
gradients contract the tokens (see `_factor_b_gradient`). A base weight
that trains keeps autodiff (the custom gradient gives it none).

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


def lora_equations(equation, b_axes=None):
    """The two einsums of an unmerged EinsumDense adapter, or `None`.

    For `inputs, kernel -> output` with `B` on the kernel axes `b_axes`
    (letters; default: the last, Keras' per-head layout) and `A` on the
    others, returns `("inputs,A->low", "low,B->output")`: `low` is the
    output with `b_axes` replaced by the rank axis. `None` when a `b_axes`
    letter is not an output axis only (no such adapter).

    Example:

    >>> lora_equations("abc,cde->abde")
    ('abc,cdf->abdf', 'abdf,fe->abde')
    >>> lora_equations("abc,cde->abde", b_axes="de")
    ('abc,cf->abf', 'abf,fde->abde')
    """
    inputs, rest = equation.split(",")
    kernel, output = rest.split("->")
    b_axes = kernel[-1] if b_axes is None else b_axes
    if not b_axes or any(c in inputs or output.count(c) != 1 for c in b_axes):
        return None
    free = next(c for c in string.ascii_lowercase if c not in equation)
    a_axes = "".join(c for c in kernel if c not in b_axes)
    low = "".join(free if c == b_axes[0] else c for c in output if c == b_axes[0] or c not in b_axes)
    return f"{inputs},{a_axes}{free}->{low}", f"{low},{free}{b_axes}->{output}"


@functools.cache  # read on every call of a layer (eagerly on torch)
def gradient_equations(equation, b_axes=None):
    """The einsums of an adapted einsum's factored passes, or `None`.

    Keys: `forward` (the equation), `low` (`x, A -> x A`), `up` (`x A, B ->
    delta`), `merge` (`A, B -> K`), `dx` (`dy, K -> dx`), `dx_low`
    (`dy B^T, A -> dx`), `g` (`dy, B -> dy B^T`), `da` (`x, g -> dA`),
    `db` (`x A, dy -> dB`); `db_flat`: how many trailing output axes `dB`
    flattens into one 2-D product (0: none), `da_plan`: whether / how `dA`
    is one. `None` where an einsum cannot express one (ellipses, an input
    axis summed away, no adapter equations).

    Example:

    >>> gradient_equations("ab,bc->ac")["da"]
    'ab,ad->bd'
    """
    lows = lora_equations(equation, b_axes)
    if lows is None or "." in equation:
        return None
    inputs, rest = equation.split(",")
    kernel, output = rest.split("->")
    if any(c not in output + kernel for c in inputs) or any(c not in inputs + output for c in kernel):
        return None
    low_eq, up_eq = lows
    a_factor, low = low_eq.split(",")[1].split("->")
    b_factor = up_eq.split(",")[1].split("->")[0]
    return {"forward": equation, "low": low_eq, "up": up_eq, "merge": f"{a_factor},{b_factor}->{kernel}",
            "dx": f"{output},{kernel}->{inputs}", "dx_low": f"{low},{a_factor}->{inputs}",
            "g": f"{output},{b_factor}->{low}", "da": f"{inputs},{low}->{a_factor}",
            "db": f"{low},{output}->{b_factor}",
            "db_flat": len(b_factor) - 1 if output.endswith(b_factor[1:]) else 0,
            "da_plan": _flat_plan(inputs, low, a_factor)}


def _flat_plan(inputs, low, factor):
    """How `_factor_a_gradient` forms `dA` (axes `factor`) as one 2-D
    product: `(token axes, permutation)` from `(low's other axes, the input's
    contracted axes)` to `factor`, or `None` where the token axes do not
    lead both operands or the input keeps an axis of `A`."""
    tokens = "".join(c for c in inputs if c not in factor)
    rest = low[len(tokens):] + inputs[len(tokens):]
    if not (inputs.startswith(tokens) and low.startswith(tokens)) or sorted(rest) != sorted(factor):
        return None
    return len(tokens), tuple(rest.index(c) for c in factor)


def prefers_merged(layer, input_shape, kernel_shape, contracted):
    """Whether the merged form is the cheaper one (see the module docstring).

    The weight is a `rows x columns` matrix, `rows` its axes the input
    contracts (`contracted`: one flag per kernel axis); the input holds
    `size / rows` tokens. Unknown dimensions (a symbolic batch) choose the
    unmerged form, which forms nothing the size of the weight.
    """
    if any(d is None for d in input_shape):
        return False
    rows = math.prod(d for d, flag in zip(kernel_shape, contracted) if flag)
    columns = math.prod(kernel_shape) // rows
    return math.prod(input_shape) // rows >= 2 * rows * columns / (rows + columns)


def lora_with_factored_gradient(equations, scale, merged):
    """`f(x, w, a, b) = einsum(x, w + scale * a b)`, computed merged or
    unmerged, whose gradient never forms `dK`: `w` gets none, `a` and `b`
    theirs from the factors: `dA = s x^T (dy B^T)`, `dB = s (x A)^T dy`,
    and `dx` from `K` (merged) or `dy W^T + s (dy B^T) A^T` (unmerged).

    The scale multiplies `B` once (the smallest operand), so no pass over
    the activations exists only to scale them; the merged form keeps its
    `K` for the backward pass, as autodiff of Keras' merged LoRA does.
    """

    @ops.custom_gradient
    def forward(x, w, a, b):
        b_scaled = ops.multiply(b, scale)
        low = None if merged else ops.einsum(equations["low"], x, a)
        kernel = ops.add(w, ops.einsum(equations["merge"], a, b_scaled)) if merged else None

        def grad(*args, upstream=None):
            dy = args[0] if upstream is None else upstream  # torch passes `upstream`
            g = ops.einsum(equations["g"], dy, b_scaled)
            if merged:
                dx = ops.einsum(equations["dx"], dy, kernel)
            else:
                dx = _plus_product(ops.einsum(equations["dx"], dy, w), equations["dx_low"], g, a)
            da = _factor_a_gradient(equations, x, g)
            x_a = ops.einsum(equations["low"], x, a) if low is None else low
            db = ops.multiply(_factor_b_gradient(equations, x_a, dy), scale)
            return dx, None, da, db

        if merged:
            return ops.einsum(equations["forward"], x, kernel), grad
        return _plus_product(ops.einsum(equations["forward"], x, w), equations["up"], low, b_scaled), grad

    return forward


def _plus_product(total, equation, p, q):
    """`total + einsum(equation, p, q)`. On eager torch, where the einsum is
    a 2-D product, one GEMM that accumulates into `total` (a fresh tensor):
    that backend fuses nothing, and a separate sum is one more pass over
    the output (benchmarks/bench_eager.py)."""
    plan = accumulate_plan(equation) if keras.backend.backend() == "torch" else None
    if plan is None or not total.is_contiguous():
        return ops.add(total, ops.einsum(equation, p, q))
    contracted, transposed = plan
    size = math.prod(p.shape[-contracted:])
    q = ops.transpose(ops.reshape(q, (-1, size))) if transposed else ops.reshape(q, (size, -1))
    total.view(-1, q.shape[1]).addmm_(ops.reshape(p, (-1, size)), q)
    return total


@functools.cache
def accumulate_plan(equation):
    """`(contracted axes, q transposed)` where `p, q -> out` is `p`'s leading
    axes times `q`'s free axes, `q` laid out `(contracted, free)` or
    `(free, contracted)` (`transposed`); else `None`.

    Example:

    >>> accumulate_plan("abe,ed->abd"), accumulate_plan("abe,ce->abc")
    ((1, False), (1, True))
    """
    operands, out = equation.split("->")
    p, q = operands.split(",")
    contracted = "".join(c for c in p if c in q and c not in out)
    free = "".join(c for c in q if c not in contracted)
    if not contracted or not p.endswith(contracted) or p[:-len(contracted)] + free != out:
        return None
    if q == contracted + free or q == free + contracted:
        return len(contracted), q != contracted + free
    return None


def _flat_products():
    """Whether the factors' gradients are written as flattened 2-D products
    (for XLA's layouts, see `_factor_b_gradient`). Eager torch takes the one
    einsum instead: its einsum flattens in C++, where each of the six ops
    written out here costs a Python dispatch per layer and step."""
    return keras.backend.backend() != "torch"


def _factor_a_gradient(equations, x, g):
    """`x^T (dy B^T)` summed over every token axis, in `A`'s layout; one 2-D
    product of the flattened tokens where the equation allows (see
    `_factor_b_gradient`)."""
    if equations["da_plan"] is None or not _flat_products():
        return ops.einsum(equations["da"], x, g)
    tokens, order = equations["da_plan"]
    g_axes, x_axes = tuple(g.shape[tokens:]), tuple(x.shape[tokens:])
    g = ops.reshape(g, (-1, math.prod(g_axes)))
    da = ops.matmul(ops.transpose(g), ops.reshape(x, (-1, math.prod(x_axes))))
    return ops.transpose(ops.reshape(da, g_axes + x_axes), order)


def _factor_b_gradient(equations, x_a, dy):
    """`(x A)^T dy`, summed over every token axis.

    As one 2-D product when `B`'s axes are the output's last (every KerasHub
    projection): given the einsum, XLA on CPU may lay `dy` out transposed and
    fuse that transpose into the op that produced `dy`, a strided pass that
    cost more than the layer's matmuls in a Gemma MLP.
    """
    flat = equations["db_flat"]
    if not flat or not _flat_products():
        return ops.einsum(equations["db"], x_a, dy)
    columns = tuple(dy.shape[-flat:])
    x_a = ops.reshape(x_a, (-1, x_a.shape[-1]))
    db = ops.matmul(ops.transpose(x_a), ops.reshape(dy, (-1, math.prod(columns))))
    return ops.reshape(db, (x_a.shape[-1],) + columns)


def _b_axes(layer, kernel):
    """The letters of `kernel` on the layer's `B` side."""
    return "".join(kernel[i] for i in lora.factor_axes(layer)[1])


def _operands(layer, dtype, b_axes_shape):
    """The frozen weight and `(A, B)` as tensors in the compute dtype (the
    factors are float32 variables; some backends' einsum and matmul refuse
    mixed dtypes, and none should promote the layer); `B` in the shape
    `(rank,) + b_axes_shape` its einsums use."""
    w, a, b = (_as_dtype(v, dtype) for v in (internals.base_weight(layer), *lora.lora_factors(layer)))
    return w, a, ops.reshape(b, (b.shape[0],) + b_axes_shape)


def _as_dtype(variable, dtype):
    """`variable`'s value in `dtype`, without a cast op where it already is
    (on eager torch every op costs a Python dispatch, per layer and step)."""
    if variable.dtype == keras.backend.standardize_dtype(dtype):
        return variable.value
    return ops.cast(variable, dtype)


def _scale(layer):
    return layer.lora_alpha / layer.lora_rank


def _finish(layer, x):
    if layer.bias is not None:
        x = ops.add(x, layer.bias)
    if layer.activation is not None:
        x = layer.activation(x)
    return x


def adapted_einsum(layer, inputs, equation):
    """`einsum(equation, inputs, W + s A @ B)` of `layer`, the adapter's
    gradients from its factors, without bias or activation."""
    input_axes, kernel_axes = equation.split("->")[0].split(",")
    b_axes = _b_axes(layer, kernel_axes)
    shape = lora.kernel_shape(layer)
    w, a, b = _operands(layer, inputs.dtype, tuple(shape[kernel_axes.index(c)] for c in b_axes))
    gradients = gradient_equations(equation, b_axes)
    contracted = [c in input_axes for c in kernel_axes]
    merged = gradients is not None and prefers_merged(layer, tuple(inputs.shape), w.shape, contracted)
    if gradients is None or internals.base_weight(layer).trainable:
        low_eq, up_eq = lora_equations(equation, b_axes)  # autodiff (the base weight's gradient too)
        delta = ops.multiply(ops.einsum(up_eq, ops.einsum(low_eq, inputs, a), b), _scale(layer))
        return ops.add(ops.einsum(equation, inputs, w), delta)
    return lora_with_factored_gradient(gradients, _scale(layer), merged)(inputs, w, a, b)


def dense_equation(ndim):
    """`Dense`'s product as an einsum for inputs of rank `ndim`.

    >>> dense_equation(3)
    'abc,cd->abd'
    """
    batch = string.ascii_lowercase[: ndim - 1]
    inner, out = string.ascii_lowercase[ndim - 1 : ndim + 1]
    return f"{batch}{inner},{inner}{out}->{batch}{out}"


def dense_call(layer, inputs):
    """`Dense.call`, the adapter's gradients from its factors."""
    return _finish(layer, adapted_einsum(layer, inputs, dense_equation(len(inputs.shape))))


def einsum_dense_call(layer, inputs):
    """`EinsumDense.call`, the adapter's gradients from its factors (the
    kernel axes of `B` must be output axes: see `lora_equations`)."""
    return _finish(layer, adapted_einsum(layer, inputs, layer.equation))


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
        kernel = layer.equation.split("->")[0].split(",")[1]
        if lora_equations(layer.equation, _b_axes(layer, kernel)) is None:
            return None
        return lambda inputs: einsum_dense_call(layer, inputs)
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
            if layer.lora_enabled and layer.quantization_mode is not None and internals.overrides_kernel(layer):
                raise ValueError(
                    f"Layer '{layer.path}': a 'full' factorization adapter needs a float kernel "
                    "(Keras' quantized LoRA computes per head). Received: "
                    f"quantization_mode={layer.quantization_mode!r}"
                )
            if not layer.lora_enabled or layer.quantization_mode is not None:
                return original(inputs, *args, **kwargs)
            return fast(inputs)

        return call

    internals.wrap_method(layer, "call", wrapper)
    return True
