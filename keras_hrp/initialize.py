"""`initialize_lora`: baseline LoRA initializations on a model's layers."""

import keras
from keras import ops

from keras_hrp import lora
from keras_hrp.initializers import baselines


def _keras_default(w, rank, scale=1.0):
    initializer = keras.initializers.get(lora.DEFAULT_A_INITIALIZER)
    return initializer((w.shape[0], rank), "float32"), ops.zeros((rank, w.shape[1])), None


METHODS = {
    "keras": _keras_default,
    "gaussian": baselines.gaussian,
    "pissa": baselines.pissa,
    "milora": baselines.milora,
    "olora": baselines.olora,
}


def _base_weight(layer):
    if layer.quantization_mode is not None:
        raise ValueError(
            f"initialize_lora: layer '{layer.path}' is quantized; methods that rewrite "
            f"the base weight need a float one. Received: "
            f"quantization_mode={layer.quantization_mode!r}"
        )
    return layer._embeddings if isinstance(layer, keras.layers.Embedding) else layer._kernel


def initialize_lora(model_or_layers, method):
    """Re-initializes the LoRA adapters of layers with Keras LoRA enabled.

    Methods: `"keras"` (A he_uniform, B zeros), `"gaussian"`, `"pissa"`,
    `"milora"`, `"olora"` (see `keras_hrp.initializers.baselines`). For HRP
    use `enable_hrp` / `HRPDense` with `HRPCallback`. PiSSA, MiLoRA and OLoRA
    move part of the frozen weight into the adapter and keep the residual in
    the base weight, so the model's output (and the merged kernel Keras
    exports) is unchanged at initialization.

    Args:
        model_or_layers: a Keras model (every LoRA layer in it) or a list of
            layers, each a `Dense`, `EinsumDense` or `Embedding` with LoRA.
        method: one of `METHODS`.

    Returns:
        The paths of the initialized layers.
    """
    if method not in METHODS:
        raise ValueError(
            f"initialize_lora: unknown `method`; expected one of {sorted(METHODS)}. "
            f"Received: method={method!r}"
        )
    if isinstance(model_or_layers, keras.Model):
        layers = [
            layer for layer in model_or_layers._flatten_layers(include_self=False)
            if getattr(layer, "lora_enabled", False)
        ]
    else:
        layers = list(model_or_layers)
    for layer in layers:
        a_var, b_var = lora.lora_factors(layer)
        base = _base_weight(layer)
        w = ops.reshape(ops.cast(base, "float32"), lora.weight_matrix_shape(layer))
        a, b, residual = METHODS[method](w, layer.lora_rank, scale=lora.lora_scale(layer))
        a_var.assign(ops.reshape(a, a_var.shape))
        b_var.assign(b)
        if residual is not None:
            base.assign(ops.cast(ops.reshape(residual, base.shape), base.dtype))
    return [layer.path for layer in layers]
