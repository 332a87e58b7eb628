"""`initialize_lora`: baseline LoRA initializations on a model's layers."""

import keras
import numpy as np
from keras import ops

from keras_hrp import internals
from keras_hrp import lora
from keras_hrp import settings
from keras_hrp.gradients import weight_gradients
from keras_hrp.initializers import baselines
from keras_hrp.initializers import expected_norm

METHODS = ("keras", "gaussian", "pissa", "milora", "olora", "lora_ga", "eva", "oracle")
SVD_METHODS = ("auto", "full", "randomized")
OWNER = "initialize_lora"


def _base_weight(layer):
    if layer.quantization_mode is not None:
        raise ValueError(
            f"initialize_lora: layer '{layer.path}' is quantized; methods that rewrite "
            f"the base weight need a float one. Received: "
            f"quantization_mode={layer.quantization_mode!r}"
        )
    return internals.base_weight(layer)


def _lora_layers(model_or_layers):
    if isinstance(model_or_layers, keras.Model):
        return [
            layer for layer in internals.all_layers(model_or_layers, include_self=False)
            if getattr(layer, "lora_enabled", False)
        ]
    if not isinstance(model_or_layers, (list, tuple)) or not all(
        isinstance(layer, keras.layers.Layer) for layer in model_or_layers
    ):
        settings.fail(
            OWNER, "`model_or_layers` must be a Keras model or a list of layers",
            error=TypeError, model_or_layers=model_or_layers,
        )
    without = [layer.name for layer in model_or_layers if not getattr(layer, "lora_enabled", False)]
    if without:
        settings.fail(OWNER, "every layer needs LoRA enabled first", layers=without)
    return list(model_or_layers)


def _gradients(model_or_layers, layers, data, loss):
    if not isinstance(model_or_layers, keras.Model) or data is None:
        raise ValueError(
            "initialize_lora: method 'lora_ga' needs the model (not a list of layers) "
            "and `data`, an iterable of (x, y) batches. Received: "
            f"model_or_layers={type(model_or_layers).__name__}, data={data!r}"
        )
    model = model_or_layers
    loss = loss if loss is not None else getattr(model, "loss", None)
    if loss is None or isinstance(loss, (dict, list, tuple)):
        raise ValueError(
            "initialize_lora: method 'lora_ga' needs one loss: pass `loss` or compile "
            f"the model with a single loss. Received: loss={loss!r}"
        )
    grads = weight_gradients(
        model, [_base_weight(layer) for layer in layers], data, keras.losses.get(loss)
    )
    return dict(zip([layer.path for layer in layers], grads))


def _contracted_axes(layer):
    """`(input axes the weight contracts, in A's order; positions of A's
    axes that are output axes only)` of a Dense / EinsumDense layer, input axes by
    position. EVA's directions live on the first, repeat along the second."""
    if isinstance(layer, keras.layers.Embedding):
        settings.fail(OWNER, f"method 'eva' needs a Dense or EinsumDense layer; '{layer.path}' is an "
                      "Embedding (its inputs are ids)", layer=type(layer).__name__)
    if not isinstance(layer, keras.layers.EinsumDense):
        return None, ()
    inputs, rest = layer.equation.split(",")
    kernel, output = rest.split("->")
    shared = [c for c in inputs if c in kernel and c in output]
    if shared or "." in layer.equation:
        settings.fail(OWNER, f"method 'eva' cannot read the inputs of layer '{layer.path}' as tokens x "
                      "features (an axis is in its input, kernel and output, or an ellipsis)",
                      equation=layer.equation)
    a_axes = [kernel[i] for i in lora.factor_axes(layer)[0]]
    return [inputs.index(c) for c in a_axes if c in inputs], tuple(
        i for i, c in enumerate(a_axes) if c not in inputs)


def _input_grams(model, layers, data):
    """Per layer path, `X^T X` of its inputs over `data` (float64)."""
    if data is None:
        settings.fail(OWNER, "method 'eva' needs `data`, an iterable of batches (x or (x, y))", data=data)
    plans = {layer.path: _contracted_axes(layer)[0] for layer in layers}
    grams = {}

    def observe(layer, inputs):
        x = ops.convert_to_numpy(inputs).astype("float64")
        axes = plans[layer.path]
        if axes is not None:
            x = np.transpose(x, [i for i in range(x.ndim) if i not in axes] + axes)
            x = x.reshape(-1, int(np.prod([inputs.shape[i] for i in axes])))
        else:
            x = x.reshape(-1, x.shape[-1])
        grams[layer.path] = grams.get(layer.path, 0.0) + x.T @ x

    with internals.observed_inputs(layers, observe):
        for batch in data:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x, training=False)
    missing = [layer.path for layer in layers if layer.path not in grams]
    if missing:
        settings.fail(OWNER, "method 'eva': these layers saw no input on `data`", layers=missing)
    return grams


def _eva_a(layer, gram, a_shape):
    """EVA's directions placed in `A`'s shape, repeated along A's output axes (heads)."""
    directions = ops.convert_to_numpy(baselines.eva(gram, layer.lora_rank))
    _, repeated = _contracted_axes(layer)
    kept = [d for i, d in enumerate(a_shape[:-1]) if i not in repeated]
    a = directions.reshape(kept + [a_shape[-1]])
    for axis in repeated:
        a = np.expand_dims(a, axis)
    return np.broadcast_to(a, a_shape).astype("float32")


def _target(targets, layer, shape):
    if targets is None or layer.path not in targets:
        raise ValueError(
            f"initialize_lora: method 'oracle' needs `targets[{layer.path!r}]`, the "
            f"true update of that layer. Received: targets keys="
            f"{None if targets is None else sorted(targets)}"
        )
    target = ops.convert_to_tensor(targets[layer.path], "float32")
    if tuple(target.shape) == lora.kernel_shape(layer):
        return lora.to_matrix(layer, target)
    return ops.reshape(target, shape)


def initialize_lora(
    model_or_layers, method, data=None, loss=None, targets=None, svd="auto"
):
    """Re-initializes the LoRA adapters of layers with Keras LoRA enabled.

    Methods (pure functions in `keras_hrp.initializers.baselines`):
    - `"keras"`: A he_uniform, B zeros (Keras' default); `"gaussian"`:
      A ~ N(0, 1/r), B zeros.
    - `"pissa"` / `"milora"`: the top / bottom `r` singular triplets of the
      frozen weight; `"olora"`: its QR factors.
    - `"lora_ga"`: from the SVD of the loss gradient of the frozen weight,
      averaged over `data`.
    - `"eva"`: `A` = the top-`r` principal directions of the layer's inputs
      over `data` (orthonormal; a per-head EinsumDense adapter gets them in
      every head), `B = 0`. PEFT's EVA also redistributes ranks between
      layers; this one keeps each layer's rank.
    - `"oracle"`: A from the top directions of a known update `targets`.
    For HRP use `enable_hrp` / `HRPDense` with `HRPCallback`.

    PiSSA, MiLoRA, OLoRA and LoRA-GA modify the base weight: they move part
    of it into the adapter and keep the residual, so the model's output (and
    the merged kernel Keras exports) is unchanged at initialization.

    Args:
        model_or_layers: a Keras model (every LoRA layer in it) or a list of
            layers, each a `Dense`, `EinsumDense` or `Embedding` with LoRA.
        method: one of `METHODS`.
        data: `"lora_ga"`: an iterable of `(x, y)` batches; `"eva"`: of
            batches `x` or `(x, ...)`.
        loss: `"lora_ga"` only: `loss(y_true, y_pred)`; defaults to the
            compiled model's loss.
        targets: `"oracle"` only: `{layer path: true update}`, each shaped
            like the layer's weight (or its `(m, n)` matrix, see
            `keras_hrp.lora.to_matrix`).
        svd: `"auto"`, `"full"` or `"randomized"` (see
            `keras_hrp.linalg.truncated_svd`), for PiSSA and LoRA-GA.

    Returns:
        The paths of the initialized layers.

    Example:

    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="proj")], name="net")
    >>> model.get_layer("proj").enable_lora(2)
    >>> keras_hrp.initialize_lora(model, "pissa")
    ['net/proj']
    """
    settings.choice(OWNER, "method", method, METHODS)
    settings.choice(OWNER, "svd", svd, SVD_METHODS)
    if targets is not None and not isinstance(targets, dict):
        settings.fail(OWNER, "`targets` must be a dict {layer path: update}", targets=targets)
    layers = _lora_layers(model_or_layers)
    if not layers:
        name = getattr(model_or_layers, "name", None) or [layer.name for layer in model_or_layers]
        settings.fail(OWNER, "no layer has LoRA enabled: nothing to initialize (enable it first: "
                      "enable_hrp, or a layer's enable_lora)", model_or_layers=name)
    grads = _gradients(model_or_layers, layers, data, loss) if method == "lora_ga" else None
    if method == "eva":
        if not isinstance(model_or_layers, keras.Model):
            settings.fail(OWNER, "method 'eva' needs the model (to run `data` through it)",
                          model_or_layers=type(model_or_layers).__name__)
        grams = _input_grams(model_or_layers, layers, data)
    for layer in layers:
        a_var, b_var = lora.lora_factors(layer)
        base = _base_weight(layer)
        shape, rank, scale = lora.weight_matrix_shape(layer), layer.lora_rank, lora.lora_scale(layer)
        w = lora.to_matrix(layer, ops.cast(base, "float32"))
        if method == "keras":
            a = keras.initializers.get(lora.DEFAULT_A_INITIALIZER)((shape[0], rank), "float32")
            b, residual = ops.zeros((rank, shape[1])), None
        elif method == "gaussian":
            a, b, residual = baselines.gaussian(w, rank, scale)
        elif method == "pissa":
            a, b, residual = baselines.pissa(w, rank, scale, svd=svd)
        elif method == "lora_ga":
            grad = lora.to_matrix(layer, ops.convert_to_tensor(grads[layer.path], "float32"))
            a, b, residual = baselines.lora_ga(w, grad, rank, scale, svd=svd)
        elif method == "eva":
            a = ops.reshape(_eva_a(layer, grams[layer.path], tuple(a_var.shape)), (shape[0], rank))
            b, residual = ops.zeros((rank, shape[1])), None
        elif method == "oracle":
            norm = expected_norm(lora.DEFAULT_A_INITIALIZER, a_var.shape)
            a, b, residual = baselines.oracle(w, _target(targets, layer, shape), rank, norm)
        else:
            a, b, residual = getattr(baselines, method)(w, rank, scale)
        a_var.assign(ops.reshape(a, a_var.shape))
        b_var.assign(b)
        if residual is not None:
            base.assign(ops.cast(lora.to_kernel(layer, residual), base.dtype))
            layer.hrp_moved_base = method  # the frozen weight is no longer the pretrained one
            moved = [ops.convert_to_numpy(v).astype("float32") for v in (a_var, b_var)]
            previous = getattr(layer, "hrp_moved_factors", None)  # a second init moves more
            if previous is not None:
                moved = [np.concatenate([previous[0], moved[0]], axis=-1), np.concatenate([previous[1], moved[1]])]
            layer.hrp_moved_factors = tuple(moved)  # pretrained = frozen + scale * A0 @ B0 (export_peft)
    return [layer.path for layer in layers]
